"""GPU attention kernels from a `MaskSpec`: cuDNN flash attention and jax's Pallas Triton flash kernel.

- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`. It takes a causal mask, a left
  window with it (`local_window_size=(left, 0)`), or no mask; padding as per-row lengths, which
  describe right-padded rows only (the dispatch checks that at run time). It refuses symmetric windows
  without a causal mask, has no segment ids, no fp32, and head_dim 256 needs Hopper.
- `triton`: `jax.experimental.pallas.ops.gpu.attention.mha` (FlashAttention-2 in Pallas/Triton, fused
  backward). It takes a causal flag and segment ids (packed documents, padding as segments of its own),
  not windows, and no GQA: KV heads are repeated to the query heads. Under a mesh it runs per device.
  Off GPU it runs in Pallas' interpret mode (slow; for tests). Its module is imported on first use: a
  jax without it fails this kernel only, which the dispatch then refuses.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bidirlm_jax.kernels.masks import MaskSpec, Segments
from bidirlm_jax.kernels.shard import per_device

# jax's defaults (`BlockSizes.get_default()`); the config's block sizes are splash's and chunked's.
TRITON_BLOCKS = dict(block_q=128, block_k=128, block_q_dkv=32, block_kv_dkv=32, block_q_dq=32, block_kv_dq=32)


def cudnn(q, k, v, spec: MaskSpec, segments: Segments, *, scale: float) -> jax.Array:
    """cuDNN flash attention; lengths stand for the padding, so only right-padded rows are exact."""
    kw = {}
    if spec.left is not None:
        kw["local_window_size"] = (spec.left, 0)
    if segments.padded:
        lengths = segments.lengths()
        kw.update(query_seq_lengths=lengths, key_value_seq_lengths=lengths)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=spec.causal, implementation="cudnn", **kw)


def triton_refusal(spec: MaskSpec, t: int) -> str | None:
    """Why the Triton kernel cannot compute this case, or None."""
    if spec.banded:
        return "it has no sliding window"
    sizes = {min(b, t) for b in TRITON_BLOCKS.values()}
    if any(t % b for b in sizes):
        return f"sequence {t} is not a multiple of its blocks {sorted(sizes)}"
    return None


def _triton_local(q, k, v, ids, *, causal: bool, scale: float) -> jax.Array:
    from jax.experimental.pallas.ops.gpu import attention as triton_mha

    h, kv = q.shape[2], k.shape[2]
    if kv != h:
        k, v = (jnp.repeat(x, h // kv, axis=2) for x in (k, v))
    interpret = jax.devices()[0].platform != "gpu"
    return triton_mha.mha(
        q,
        k,
        v,
        ids,
        sm_scale=scale,
        causal=causal,
        block_sizes=triton_mha.BlockSizes(**TRITON_BLOCKS),
        interpret=interpret,
    ).astype(q.dtype)


def triton(q, k, v, spec: MaskSpec, segments: Segments, *, scale: float) -> jax.Array:
    """Pallas Triton flash attention (no window) over the mesh."""
    ids = segments.kernel_ids() if segments.masked else None
    return per_device(functools.partial(_triton_local, causal=spec.causal, scale=scale), q, k, v, ids)
