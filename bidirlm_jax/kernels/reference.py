"""Plain softmax attention over a dense mask: the function every attention kernel must compute.

Every kernel takes q [B, T, H, D] and k/v [B, S, KV, D] (H a multiple of KV: grouped-query attention),
a `MaskSpec` and the call's `Segments`, and returns [B, T, H, D]. The softmax runs in fp32 as in
transformers. No attention-logit soft-capping: transformers' Gemma3 keeps `attn_logit_softcapping`
in its config but never applies it (QK-norm replaced it), and parity is the law.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bidirlm_jax.kernels.masks import MaskSpec, Segments, dense_mask


def softmax_attention(q, k, v, mask, scale: float) -> jax.Array:
    """q [..., G, T, D], k/v [..., S, D], mask [..., T, S] -> [..., G, T, D]; fp32 softmax as transformers'."""
    logits = jnp.einsum("...gtd,...sd->...gts", q, k).astype(jnp.float32) * scale
    logits = jnp.where(mask[..., None, :, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("...gts,...sd->...gtd", probs, v)


def heads_first(q, k, v):
    """[B, T, H, D] -> q [B, KV, G, T, D] and k/v [B, KV, S, D] (G query heads share each KV head)."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)
    return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def heads_last(out: jax.Array) -> jax.Array:
    """[B, KV, G, T, D] -> [B, T, KV·G, D]."""
    b, kv, g, t, d = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, d)


def reference_attention(q, k, v, spec: MaskSpec, segments: Segments, *, scale: float) -> jax.Array:
    """Softmax attention with GQA over the whole `[B, 1, T, S]` mask."""
    q, k, v = heads_first(q, k, v)
    mask = dense_mask(spec, segments)  # [B, 1, T, S] broadcasts over KV heads
    return heads_last(softmax_attention(q, k, v, mask, scale))
