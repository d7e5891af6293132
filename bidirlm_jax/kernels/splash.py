"""TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) from a `MaskSpec`.

The band becomes a splash mask, which skips the blocks it excludes: `FullMask` (bidirectional global),
`CausalMask`, `LocalMask((left, right))` (inclusive on both sides, the same convention as `MaskSpec`:
Gemma3's "half" is `(W//2, W//2)`, "full" `(W, W)`, causal sliding `(W-1, 0)`). Packed documents and
padding go in as `SegmentIds` (padding as segments of its own), applied inside computed blocks.
One KV head runs as MQA (`make_splash_mqa`), several as GQA (`make_splash_mha`, k/v `[KV, S, D]`).
Splash does not scale q, so q is multiplied by the attention scale first (Gemma3's
`query_pre_attn_scalar`). Block sizes must tile the sequence in multiples of 128 (`refusal` says why
not). Off TPU the kernel runs in Pallas' interpret mode (slow; for tests). The kernel module is
imported on first use: a jax without it fails this kernel only, which the dispatch then refuses.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bidirlm_jax.kernels.masks import MaskSpec, Segments
from bidirlm_jax.kernels.shard import per_device

LANES = 128  # block sizes must be multiples of the TPU's lane count


def blocks(block_q: int, block_kv: int, t: int, s: int) -> tuple[int, int]:
    """The configured block sizes clipped to the sequence."""
    return min(block_q, t), min(block_kv, s)


def refusal(t: int, s: int, block_q: int, block_kv: int) -> str | None:
    """Why splash cannot tile these lengths with these blocks, or None."""
    bq, bkv = blocks(block_q, block_kv, t, s)
    if bq % LANES or bkv % LANES:
        return f"blocks ({bq}, {bkv}) are not multiples of {LANES} (sequence {t} too short or block sizes odd)"
    if t % bq or s % bkv:
        return f"sequence {t} is not a multiple of the blocks ({bq}, {bkv}); pad it or change attention_block_q/kv"
    return None


def splash_mask(spec: MaskSpec, shape: tuple[int, int]):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    if spec.left is None and spec.right is None:
        return splash.FullMask(shape)
    if spec.left is None and spec.right == 0:
        return splash.CausalMask(shape)
    return splash.LocalMask(shape, window_size=(spec.left, spec.right), offset=0)


@functools.cache
def _kernel(spec: MaskSpec, t: int, s: int, heads: int, mqa: bool, bq: int, bkv: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    mask = splash.MultiHeadMask([splash_mask(spec, (t, s))] * heads)
    sizes = splash.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    make = splash.make_splash_mqa if mqa else splash.make_splash_mha
    with jax.ensure_compile_time_eval():  # concrete mask tables, safe to cache across traces
        return make(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _local(q, k, v, ids, *, spec: MaskSpec, scale: float, block_q: int, block_kv: int) -> jax.Array:
    """One device's rows and heads: q [b, T, h, D], k/v [b, S, kv, D], ids [b, T] or None."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    t, h, s, kv = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    interpret = jax.devices()[0].platform != "tpu"
    kernel = _kernel(spec, t, s, h, kv == 1, *blocks(block_q, block_kv, t, s), interpret)
    q = (q.astype(jnp.float32) * scale).astype(q.dtype).transpose(0, 2, 1, 3)  # [b, h, T, D]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv, S, D]
    if kv == 1:
        k, v = k[:, 0], v[:, 0]
    if ids is None:
        out = jax.vmap(kernel)(q, k, v)
    else:
        out = jax.vmap(lambda q, k, v, i: kernel(q, k, v, segment_ids=splash.SegmentIds(i, i)))(q, k, v, ids)
    return out.transpose(0, 2, 1, 3)


def splash_attention(
    q, k, v, spec: MaskSpec, segments: Segments, *, scale: float, block_q: int, block_kv: int
) -> jax.Array:
    """Splash attention over the mesh (each device its rows and heads); see the module docstring."""
    ids = segments.kernel_ids() if segments.masked else None
    local = functools.partial(_local, spec=spec, scale=scale, block_q=block_q, block_kv=block_kv)
    return per_device(local, q, k, v, ids)
