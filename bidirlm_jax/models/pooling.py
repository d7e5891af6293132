"""Pooling of final hidden states into one embedding per text: the one implementation that training,
`encode` and the export share, so an embedding never depends on which of them computed it.

`mean` averages every real token, the instruction prefix included (BidirLM's released encoder: sentence-
transformers' `Pooling` in mean mode over the attention mask); `last` and `first` take one real token.
Token positions come from the attention mask, never from the row length, so left and right padding give
the same embedding. Embeddings are fp32 whatever the compute dtype (the cosine loss wants them so).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models.config import POOLING_MODES


def pool(hidden: jax.Array, attention_mask: jax.Array, mode: str = "mean") -> jax.Array:
    """hidden [B, T, d], attention_mask [B, T] (1 = real token, padding on either side) -> fp32 [B, d].

    A row without real tokens pools to zeros (`mean`) or to its first / last position (`first` / `last`).
    """
    if mode not in POOLING_MODES:
        raise ConfigError(f"pooling {mode!r} is not one of {POOLING_MODES}; fix contrastive.pooling")
    hidden = jnp.asarray(hidden).astype(jnp.float32)
    valid = jnp.asarray(attention_mask) > 0
    if mode == "mean":
        weights = valid.astype(jnp.float32)
        total = jnp.einsum("btd,bt->bd", hidden, weights)
        return total / jnp.maximum(weights.sum(axis=1, keepdims=True), 1.0)
    t = valid.shape[1]
    if mode == "first":
        index = jnp.argmax(valid, axis=1)
    else:
        index = t - 1 - jnp.argmax(valid[:, ::-1], axis=1)
    return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]


def pool_segments(hidden: jax.Array, segment_ids: jax.Array, num_texts: int, mode: str = "mean") -> jax.Array:
    """hidden [B, T, ...] of packed rows, `segment_ids` [B, T] numbering each token's text 1..`num_texts`
    across the whole batch (0, or anything above `num_texts`: padding and filler) -> fp32 [num_texts, ...],
    text k from segment k + 1. A text without tokens pools to zeros in every mode.

    Scatter-adds drop the tokens of no text instead of multiplying them by zero, so a non-finite filler
    value never reaches a text.
    """
    if mode not in POOLING_MODES:
        raise ConfigError(f"pooling {mode!r} is not one of {POOLING_MODES}; fix contrastive.pooling")
    hidden = jnp.asarray(hidden).astype(jnp.float32)
    b, t = hidden.shape[:2]
    flat = hidden.reshape(b * t, *hidden.shape[2:])
    ids = jnp.asarray(segment_ids, jnp.int32).reshape(-1)
    text = jnp.where((ids >= 1) & (ids <= num_texts), ids - 1, num_texts)  # num_texts: out of range, dropped
    count = jax.ops.segment_sum(jnp.ones_like(text, jnp.float32), text, num_texts)
    present = (count > 0).reshape(-1, *[1] * (flat.ndim - 1))
    if mode == "mean":
        total = jax.ops.segment_sum(flat, text, num_texts)
        return total / jnp.maximum(count, 1.0).reshape(present.shape)
    index = jnp.arange(b * t, dtype=jnp.int32)
    pick = (
        jax.ops.segment_min(index, text, num_texts) if mode == "first" else jax.ops.segment_max(index, text, num_texts)
    )
    return jnp.where(present, flat[jnp.clip(pick, 0, b * t - 1)], 0.0)
