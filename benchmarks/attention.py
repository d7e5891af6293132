"""Attention kernels against XLA's dense one at 1k–8k tokens: forward + backward time and compiled memory.

Each kernel the platform has (`kernels.attention`: TPU splash, GPU cuDNN / Triton, CPU blocked) and
the two XLA ones (`xla`: dense `[B, H, T, S]` scores; `chunked`: query blocks, linear memory) run
the attention of one layer of a model's shape (default Qwen3-0.6B: 16 heads, 8 KV heads, head_dim 128;
Gemma3-270M: 4 heads, one KV head, head_dim 256, sliding window 512) on a packed batch (two documents
per row), bidirectional, for each band: global and Gemma3's "half" window. A kernel that cannot run a
case says why; a case whose compiled temporaries exceed `--max-gb` is compiled but not run.

    .venv/bin/python benchmarks/attention.py [--model qwen3-0.6b] [--lengths 1024 2048 4096 8192]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from measure import Bench

from bidirlm_jax.kernels.attention import KERNELS, Case, Options, refusal
from bidirlm_jax.kernels.masks import MaskSpec, Segments
from bidirlm_jax.models.presets import get_preset

PLATFORM_KERNELS = {"tpu": ["splash"], "gpu": ["cudnn", "triton"], "cpu": ["blocked"]}


def packed_segments(batch: int, t: int, padded: bool = False) -> Segments:
    """Two documents per row (split at 40 %), optionally the last eighth of each row padding."""
    ids = np.where(np.arange(t) < 2 * t // 5, 1, 2)[None].repeat(batch, 0).astype(np.int32)
    valid = np.ones((batch, t), np.int32)
    if padded:
        valid[:, t - t // 8 :] = 0
        ids = ids * valid
    return Segments.of(valid if padded else None, ids, (batch, t))


def inputs(shape, t: int, batch: int, dtype, seed: int = 0):
    """q [B, T, H, D] and k/v [B, T, KV, D] of a model's attention shape, unit normal."""
    h, kv, d = shape
    kq, kk, kv_ = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (batch, t, h, d), dtype)
    return q, jax.random.normal(kk, (batch, t, kv, d), dtype), jax.random.normal(kv_, (batch, t, kv, d), dtype)


def fwd_bwd(kernel: str, spec: MaskSpec, segments: Segments, options: Options):
    """Jitted (q, k, v) -> (sum of outputs, grads) through `kernel`."""

    def loss(q, k, v):
        return KERNELS[kernel](q, k, v, spec, segments, options).astype(jnp.float32).sum()

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def prepare(kernel: str, spec: MaskSpec, segments: Segments, q, k, v, *, scale: float, max_gb: float):
    """(run once, {temp_gb}) for one kernel and case, or (None, {skipped: why})."""
    options = Options(scale, 512, 512)
    case = Case.of(q, k, spec, segments, options)
    why = refusal(kernel, case, jax.default_backend())
    if why:
        return None, {"skipped": why}
    fn = fwd_bwd(kernel, spec, segments, options)
    try:
        compiled = fn.lower(q, k, v).compile()
    except Exception as e:  # a kernel the structural checks let through but the compiler refuses
        return None, {"skipped": f"{type(e).__name__}: {e}".splitlines()[0][:120]}
    temp = compiled.memory_analysis().temp_size_in_bytes / 1e9
    if temp > max_gb:
        return None, {"temp_gb": temp, "skipped": f"needs {temp:.1f} GB of temporaries (> --max-gb {max_gb})"}
    jax.block_until_ready(compiled(q, k, v))  # warm-up
    return lambda: jax.block_until_ready(compiled(q, k, v)), {"temp_gb": temp}


def bands(model: str) -> dict[str, MaskSpec]:
    config = get_preset(model)
    out = {"global": MaskSpec(None, None)}
    if config.sliding_window:
        out["half-window"] = MaskSpec(config.sliding_window // 2, config.sliding_window // 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on accelerators, float32 on CPU")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--max-gb", type=float, default=8.0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "attention.json"))
    args = parser.parse_args()
    bench = Bench()
    platform = jax.default_backend()
    dtype = args.dtype or ("float32" if platform == "cpu" else "bfloat16")
    config = get_preset(args.model)
    shape = (config.num_heads, config.num_kv_heads, config.head_dim)
    kernels = PLATFORM_KERNELS.get(platform, []) + ["chunked", "xla"]
    print(f"{args.model} attention {shape} (heads, KV heads, head_dim), batch {args.batch}, {dtype}, packed rows, "
          f"bidirectional, {jax.devices()[0].device_kind}: forward + backward")  # fmt: skip
    rows = []
    for band, spec in bands(args.model).items():
        for t in args.lengths:
            q, k, v = inputs(shape, t, args.batch, dtype)
            segments = packed_segments(args.batch, t)
            prepared = {kernel: prepare(kernel, spec, segments, q, k, v, scale=config.attention_scale,
                                        max_gb=args.max_gb) for kernel in kernels}  # fmt: skip
            timed = bench.rounds({kernel: run for kernel, (run, _) in prepared.items() if run}, args.iters)
            for kernel, (_, r) in prepared.items():
                if kernel in timed:
                    r.update(seconds=timed[kernel]["median"], best=timed[kernel]["best"])
                rows.append(dict(band=band, length=t, kernel=kernel, **r))
                figures = (f"{r['seconds'] * 1e3:10.1f} ms {r['temp_gb']:7.2f} GB" if "seconds" in r
                           else f"   skipped: {r['skipped']}")  # fmt: skip
                print(f"{band:<12}{t:>6}  {kernel:<8}{figures}", flush=True)
    bench.finish(args.out, dict(model=args.model, dtype=dtype, platform=platform, cases=rows))


if __name__ == "__main__":
    main()
