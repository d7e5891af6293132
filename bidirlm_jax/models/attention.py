"""Self-attention: the masks that make a decoder causal or bidirectional, and the kernel dispatch.

Masks are boolean `[B, 1, T, T]` (True = may attend), built once per forward for each layer type:

- padding: keys where `attention_mask == 0` are never attended;
- packing: with `segment_ids`, tokens only see their own segment (in both modes);
- causal: key index ≤ query index; a causal sliding layer also needs `i - j < W` (transformers);
- bidirectional sliding layers, by `bidirectional_window`:
  `"half"` |i−j| ≤ W//2 (transformers' `Gemma3TextConfig(use_bidirectional_attention=True)`),
  `"full"` |i−j| ≤ W (transformers' generic `is_causal=False`), `"none"` no window.

`attend` is the one place that picks the implementation: cuDNN flash attention on GPU in half
precision where cuDNN compiles the shape (probed once per shape, the fallback logged), a blocked kernel
on CPU, XLA's `jax.nn.dot_product_attention` otherwise, and the plain einsum reference when asked for.
There is no attention-logit soft-capping: transformers' Gemma3 keeps `attn_logit_softcapping` in its
config but never applies it (QK-norm replaced it), and parity is the law.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from flax import nnx

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models.config import SLIDING, ModelConfig
from bidirlm_jax.models.layers import RMSNorm, apply_rope, linear, param

logger = logging.getLogger(__name__)


def build_masks(config: ModelConfig, attention_mask: jax.Array, segment_ids: jax.Array | None) -> dict[str, jax.Array]:
    """The `[B, 1, T, T]` mask of each layer type present in the model."""
    t = attention_mask.shape[1]
    i = jnp.arange(t)[:, None]
    j = jnp.arange(t)[None, :]
    valid = attention_mask.astype(bool)
    base = valid[:, None, None, :]
    if segment_ids is not None:
        base = base & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    causal = config.attention == "causal"
    if causal:
        base = base & (j <= i)
    masks = {}
    for layer_type in set(config.layer_types):
        mask = base
        if layer_type == SLIDING:
            mask = mask & _window(config, i, j)
        # A padding query with nothing to attend to (left padding, causal) attends to itself, so the
        # softmax stays finite; its output is padding and never read.
        masks[layer_type] = mask | ((i == j) & ~valid[:, None, :, None])
    return masks


def _window(config: ModelConfig, i: jax.Array, j: jax.Array) -> jax.Array:
    w = config.sliding_window
    if config.attention == "causal":
        return i - j < w
    if config.bidirectional_window == "half":
        return jnp.abs(i - j) <= w // 2
    if config.bidirectional_window == "full":
        return jnp.abs(i - j) <= w
    return jnp.ones_like(i - j, dtype=bool)


def _softmax_attention(q, k, v, mask, scale: float) -> jax.Array:
    """q [..., G, T, D], k/v [..., S, D], mask [..., T, S] -> [..., G, T, D]; fp32 softmax as transformers'."""
    logits = jnp.einsum("...gtd,...sd->...gts", q, k).astype(jnp.float32) * scale
    logits = jnp.where(mask[..., None, :, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("...gts,...sd->...gtd", probs, v)


def _heads_first(q, k, v):
    """[B, T, H, D] -> q [B, KV, G, T, D] and k/v [B, KV, S, D] (G query heads share each KV head)."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)
    return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _heads_last(out: jax.Array) -> jax.Array:
    b, kv, g, t, d = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, d)


def reference_attention(q, k, v, mask, *, scale: float) -> jax.Array:
    """Plain softmax attention with GQA over [B, T, H, D]: the function every kernel must compute."""
    q, k, v = _heads_first(q, k, v)
    return _heads_last(_softmax_attention(q, k, v, mask, scale))  # mask [B, 1, T, S] broadcasts over KV heads


def blocked_attention(q, k, v, mask, *, scale: float) -> jax.Array:
    """The reference, one (sequence, KV head) at a time, each block recomputed in the backward pass.

    XLA's CPU backend neither fuses nor tiles attention: the [T, S] scores of a whole batch stream
    through memory three times, while one head's stay in cache (3x faster forward, 15% faster backward
    than `jax.nn.dot_product_attention` at 8 x 512 tokens).
    """
    q, k, v = _heads_first(q, k, v)
    b, kv = k.shape[:2]
    flat = lambda x: x.reshape(b * kv, *x.shape[2:])

    def block(args):
        i, qb, kb, vb = args
        return _softmax_attention(qb, kb, vb, mask[i // kv, 0], scale)

    out = jax.lax.map(jax.checkpoint(block), (jnp.arange(b * kv), flat(q), flat(k), flat(v)))
    return _heads_last(out.reshape(b, kv, *out.shape[1:]))


def _jax_kernel(implementation: str):
    """`jax.nn.dot_product_attention` as "xla" (fused by the compiler) or "cudnn" (flash attention)."""

    def kernel(q, k, v, mask, *, scale: float) -> jax.Array:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=implementation)

    return kernel


_KERNELS = {
    "reference": reference_attention,
    "blocked": blocked_attention,
    "xla": _jax_kernel("xla"),
    "cudnn": _jax_kernel("cudnn"),
}


@functools.cache
def cudnn_refusal(
    q_shape: tuple[int, ...], kv_shape: tuple[int, ...], mask_shape: tuple[int, ...], dtype: str
) -> str | None:
    """Why cuDNN cannot run attention of these shapes here, or None when it can (decided once per shape).

    cuDNN refuses in many ways that depend on the GPU and the cuDNN build (pre-Ampere GPUs, no cuDNN,
    head sizes without a backward kernel, ...), as `NotImplementedError`, `RuntimeError`, `ValueError` or
    an XLA error at compile time: so compile its forward and backward pass once and take any failure as no.
    """

    def loss(q, k, v, mask):
        return _KERNELS["cudnn"](q, k, v, mask, scale=1.0).astype(jnp.float32).sum()

    q, kv, mask = (
        jax.ShapeDtypeStruct(q_shape, dtype),
        jax.ShapeDtypeStruct(kv_shape, dtype),
        jax.ShapeDtypeStruct(mask_shape, bool),
    )
    try:
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, mask).compile()
    except Exception as e:
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def _refusal(q: jax.Array, k: jax.Array, mask: jax.Array) -> str | None:
    return cudnn_refusal(tuple(q.shape), tuple(k.shape), tuple(mask.shape), jnp.dtype(q.dtype).name)


def _auto(q: jax.Array, k: jax.Array, mask: jax.Array) -> tuple[str, str | None]:
    """The kernel "auto" picks for these arguments, and why cuDNN was not used where it was tried."""
    backend = jax.default_backend()
    if backend == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        refusal = _refusal(q, k, mask)
        if refusal is None:
            return "cudnn", None
        return "xla", refusal
    mesh = jax.sharding.get_abstract_mesh()
    if backend == "cpu" and (mesh.empty or mesh.size == 1):
        return "blocked", None
    return "xla", None


_logged: set[tuple] = set()


def _log_choice(layer_type: str, q: jax.Array, kernel: str, refusal: str | None) -> None:
    """Say once per layer type, shape and dtype which kernel "auto" took (and why not cuDNN)."""
    key = (layer_type, q.shape, str(q.dtype), kernel)
    if key in _logged:
        return
    _logged.add(key)
    if refusal is None:
        logger.info("attention %s %s %s: %s kernel", layer_type, tuple(q.shape), q.dtype, kernel)
    else:
        logger.warning(
            "attention %s %s %s: cuDNN refused (%s); using XLA's kernel", layer_type, tuple(q.shape), q.dtype, refusal
        )


def attend(q, k, v, mask, *, scale: float, implementation: str, layer_type: str = "attention") -> jax.Array:
    """Dispatch to a kernel; all of them compute the same function (tests hold them to it).

    "auto": cuDNN on GPU in half precision where it compiles for these shapes; on a one-device CPU
    computation the blocked kernel; XLA's fused-by-the-compiler `jax.nn.dot_product_attention` otherwise
    (a scan over a sharded batch would make the partitioner gather it). The choice is made at trace time
    and logged once per `layer_type` and shape.
    """
    if implementation == "auto":
        implementation, refusal = _auto(q, k, mask)
        _log_choice(layer_type, q, implementation, refusal)
    elif implementation == "cudnn" and (refusal := _refusal(q, k, mask)):
        raise ConfigError(f"attention_impl='cudnn' cannot run here ({refusal}); use 'auto' or 'xla'")
    return _KERNELS[implementation](q, k, v, mask, scale=scale)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, layer_type: str, *, rngs: nnx.Rngs):
        d, h, kv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.config = config
        self.layer_type = layer_type  # names the layer in the kernel choice's log line
        # [out..., in] like transformers' Linear, with heads split out so they can be sharded.
        self.q_proj = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), config)
        self.k_proj = param(rngs, (kv, hd, d), ("kv_heads", "head_dim", "embed"), config)
        self.v_proj = param(rngs, (kv, hd, d), ("kv_heads", "head_dim", "embed"), config)
        self.o_proj = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), config)
        if config.attention_bias:
            self.q_bias = param(rngs, (h, hd), ("heads", "head_dim"), config, init="zeros")
            self.k_bias = param(rngs, (kv, hd), ("kv_heads", "head_dim"), config, init="zeros")
            self.v_bias = param(rngs, (kv, hd), ("kv_heads", "head_dim"), config, init="zeros")
            self.o_bias = param(rngs, (d,), ("embed",), config, init="zeros")
        self.q_norm = RMSNorm(hd, config, rngs=rngs)
        self.k_norm = RMSNorm(hd, config, rngs=rngs)

    def _project(self, x: jax.Array, name: str) -> jax.Array:
        y = linear(x, getattr(self, f"{name}_proj"))
        if self.config.attention_bias:
            y = y + getattr(self, f"{name}_bias")[...].astype(x.dtype)
        return y

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], mask: jax.Array) -> jax.Array:
        q = apply_rope(self.q_norm(self._project(x, "q")), *rope)
        k = apply_rope(self.k_norm(self._project(x, "k")), *rope)
        v = self._project(x, "v")
        cfg = self.config
        out = attend(
            q, k, v, mask, scale=cfg.attention_scale, implementation=cfg.attention_impl, layer_type=self.layer_type
        )
        y = linear(out, self.o_proj, in_dims=2)
        if self.config.attention_bias:
            y = y + self.o_bias[...].astype(x.dtype)
        return y
