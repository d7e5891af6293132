"""`attend`: the one place that picks an attention kernel for (platform, dtype, mask, shapes).

`choose` is the decision, made at trace time and logged once per layer type and shape:

| platform | case                                                        | kernel (first that applies)        |
|----------|-------------------------------------------------------------|------------------------------------|
| TPU      | any mask                                                    | splash → chunked                   |
| GPU      | bf16/fp16, causal (global or sliding) or bidirectional      | cudnn → triton → chunked           |
|          | global, no packed segments (padding: right-padded rows at   |                                    |
|          | run time; other rows take the next kernel)                  |                                    |
|          | no window (any segments, padding, fp32)                     | triton → chunked                   |
|          | bidirectional sliding window (Gemma3 "half"/"full")         | chunked                            |
| CPU      | one device, T ≤ 2048                                        | blocked                            |
|          | otherwise                                                   | chunked                            |

"Applies" is first a structural check (cuDNN has no symmetric window and no segment ids; splash and
Triton need block-tiled lengths), then, for accelerator kernels, a compile of their forward and
backward at these shapes, once per shape: cuDNN and Pallas refuse in many ways that depend on the
chip and the library builds (pre-Ampere GPUs, head sizes without a backward kernel, ...), as Python
or XLA errors, and any failure counts as no. `chunked` (XLA, memory linear in T) applies everywhere;
`reference`, `xla` (dense scores) and `blocked` are there to be asked for by name.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.kernels import gpu, splash, xla
from bidirlm_jax.kernels.masks import MaskSpec, Segments
from bidirlm_jax.kernels.reference import reference_attention

logger = logging.getLogger(__name__)

CPU_BLOCKED_MAX_LEN = 2048  # beyond it one head's T² scores leave the cache and dominate memory
HALF = ("bfloat16", "float16")


class Options(NamedTuple):
    scale: float
    block_q: int
    block_kv: int


Kernel = Callable[[jax.Array, jax.Array, jax.Array, MaskSpec, Segments, Options], jax.Array]

KERNELS: dict[str, Kernel] = {
    "reference": lambda q, k, v, spec, seg, o: reference_attention(q, k, v, spec, seg, scale=o.scale),
    "xla": lambda q, k, v, spec, seg, o: xla.dense(q, k, v, spec, seg, scale=o.scale),
    "blocked": lambda q, k, v, spec, seg, o: xla.blocked(q, k, v, spec, seg, scale=o.scale),
    "chunked": lambda q, k, v, spec, seg, o: xla.chunked(q, k, v, spec, seg, scale=o.scale, block=o.block_q),
    "splash": lambda q, k, v, spec, seg, o: splash.splash_attention(
        q, k, v, spec, seg, scale=o.scale, block_q=o.block_q, block_kv=o.block_kv
    ),
    "cudnn": lambda q, k, v, spec, seg, o: gpu.cudnn(q, k, v, spec, seg, scale=o.scale),
    "triton": lambda q, k, v, spec, seg, o: gpu.triton(q, k, v, spec, seg, scale=o.scale),
}
ACCELERATED = {"splash": "tpu", "cudnn": "gpu", "triton": "gpu"}  # kernels probed by compiling on their platform


@dataclass(frozen=True)
class Case:
    """What the choice depends on (all static)."""

    q_shape: tuple[int, ...]
    kv_shape: tuple[int, ...]
    dtype: str
    spec: MaskSpec
    has_ids: bool
    padded: bool
    block_q: int
    block_kv: int

    @classmethod
    def of(cls, q, k, spec: MaskSpec, segments: Segments, options: Options) -> Case:
        return cls(
            tuple(q.shape),
            tuple(k.shape),
            jnp.dtype(q.dtype).name,
            spec,
            segments.ids is not None,
            segments.padded,
            options.block_q,
            options.block_kv,
        )


class Choice(NamedTuple):
    kernel: str
    refused: tuple[tuple[str, str], ...]  # (kernel, why) for each preferred kernel that did not apply
    fallback: str | None = None  # cuDNN with padding: the kernel for rows that are not right-padded


def platform() -> str:
    """The backend attention runs on (tests fake it)."""
    return jax.default_backend()


def candidates(platform: str, case: Case, single_device: bool) -> list[str]:
    """Kernels worth trying for the case, best first (the table in the module docstring)."""
    if platform == "tpu":
        return ["splash", "chunked"]
    if platform == "gpu":
        spec = case.spec
        cudnn = case.dtype in HALF and not case.has_ids and (spec.causal or not spec.banded)
        return ["cudnn"] * cudnn + ["triton", "chunked"]
    if single_device and case.q_shape[1] <= CPU_BLOCKED_MAX_LEN:
        return ["blocked"]
    return ["chunked"]


def structural_refusal(kernel: str, case: Case) -> str | None:
    """Why `kernel` cannot compute `case` by construction, or None."""
    spec, t, s = case.spec, case.q_shape[1], case.kv_shape[1]
    if kernel == "cudnn":
        if case.has_ids:
            return "cuDNN takes no segment ids"
        if spec.banded and not spec.causal:
            return f"cuDNN takes no window to the right without a causal mask (window {spec.left, spec.right})"
        if case.dtype not in HALF:
            return f"cuDNN flash attention needs bf16/fp16, not {case.dtype}"
    if kernel == "triton":
        return gpu.triton_refusal(spec, t)
    if kernel == "splash":
        return splash.refusal(t, s, case.block_q, case.block_kv)
    return None


@functools.cache
def compile_refusal(kernel: str, case: Case) -> str | None:
    """Why `kernel` does not compile here for `case` (forward and backward), or None; once per case."""
    options = Options(1.0, case.block_q, case.block_kv)

    def loss(q, k, v, valid, ids):
        segments = Segments(valid, ids, case.padded)
        return KERNELS[kernel](q, k, v, case.spec, segments, options).astype(jnp.float32).sum()

    b, t = case.q_shape[:2]
    q, kv = jax.ShapeDtypeStruct(case.q_shape, case.dtype), jax.ShapeDtypeStruct(case.kv_shape, case.dtype)
    valid = jax.ShapeDtypeStruct((b, t), bool)
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32) if case.has_ids else None
    try:
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, valid, ids).compile()
    except Exception as e:
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def refusal(kernel: str, case: Case, on: str) -> str | None:
    """Why `kernel` cannot run `case` on platform `on`: by construction, or (on its own platform) by compiling."""
    if kernel == "cudnn" and on != "gpu":
        return "cuDNN needs an NVIDIA GPU"
    reason = structural_refusal(kernel, case)
    if reason is None and ACCELERATED.get(kernel) == on:
        reason = compile_refusal(kernel, case)
    return reason


def choose(platform: str, case: Case, *, single_device: bool = True, skip: tuple[str, ...] = ()) -> Choice:
    """The kernel for `case` on `platform` (leaving out `skip`), the preferred ones it passed over and why."""
    refused = []
    for kernel in candidates(platform, case, single_device):
        if kernel in skip:
            continue
        reason = refusal(kernel, case, platform)
        if reason is not None:
            refused.append((kernel, reason))
            continue
        fallback = None
        if kernel == "cudnn" and case.padded:  # lengths only describe right padding
            fallback = choose(platform, case, single_device=single_device, skip=("cudnn",)).kernel
        return Choice(kernel, tuple(refused), fallback)
    raise AssertionError(f"no attention kernel for {case}")  # `chunked` applies to every case


_logged: set[tuple] = set()


def _log_choice(layer_type: str, case: Case, choice: Choice) -> None:
    """Say once per layer type, shape, dtype and kernel which kernel "auto" took (and what it passed over)."""
    key = (layer_type, case.q_shape, case.dtype, choice.kernel)
    if key in _logged:
        return
    _logged.add(key)
    extra = f" ({choice.fallback} for rows that are not right-padded)" if choice.fallback else ""
    if not choice.refused:
        logger.info("attention %s %s %s: %s kernel%s", layer_type, case.q_shape, case.dtype, choice.kernel, extra)
    else:
        why = "; ".join(f"{k} refused: {r}" for k, r in choice.refused)
        logger.warning(
            "attention %s %s %s: %s; using the %s kernel%s",
            layer_type,
            case.q_shape,
            case.dtype,
            why,
            choice.kernel,
            extra,
        )


def _single_device() -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    spec: MaskSpec,
    segments: Segments,
    *,
    scale: float,
    implementation: str = "auto",
    layer_type: str = "attention",
    block_q: int = 512,
    block_kv: int = 512,
) -> jax.Array:
    """Softmax attention of q [B, T, H, D] over k/v [B, S, KV, D] under `spec` and `segments`.

    "auto" takes `choose`'s kernel; a kernel asked for by name that cannot run this case raises a
    `ConfigError` saying why. All kernels compute the same function on real tokens (tests hold them to it).
    """
    options = Options(scale, block_q, block_kv)
    case = Case.of(q, k, spec, segments, options)
    if implementation == "auto":
        choice = choose(platform(), case, single_device=_single_device())
        _log_choice(layer_type, case, choice)
    elif implementation not in KERNELS:
        raise ConfigError(f"attention_impl {implementation!r} is not one of {['auto', *KERNELS]}")
    elif reason := refusal(implementation, case, platform()):
        raise ConfigError(f"attention_impl={implementation!r} cannot run here ({reason}); use 'auto'")
    else:
        choice = Choice(implementation, ())
    run = functools.partial(_run, KERNELS[choice.kernel], spec=spec, segments=segments, options=options)
    if choice.fallback is None:
        return run(q, k, v)
    other = functools.partial(_run, KERNELS[choice.fallback], spec=spec, segments=segments, options=options)
    return jax.lax.cond(segments.right_padded(), run, other, q, k, v)


def _run(kernel: Kernel, q, k, v, *, spec: MaskSpec, segments: Segments, options: Options) -> jax.Array:
    return kernel(q, k, v, spec, segments, options)
