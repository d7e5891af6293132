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
