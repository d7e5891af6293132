"""Merging a tower's tokens into the text embeddings at placeholder positions (images, audio), as
transformers' `masked_scatter` does: in row-major order over the whole batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def merge_placeholders(x: jax.Array, placeholders: jax.Array, tokens: jax.Array) -> jax.Array:
    """`x` [B, T, d] with the positions where `placeholders` [B, T] is true replaced, in row-major order,
    by the rows of `tokens` [M, d] (M ≥ the number of placeholders; later rows are never read)."""
    index = jnp.cumsum(placeholders.reshape(-1)).reshape(placeholders.shape) - 1
    gathered = jnp.take(tokens, jnp.clip(index, 0, tokens.shape[0] - 1), axis=0).astype(x.dtype)
    return jnp.where(placeholders[..., None], gathered, x)


def valid_first(shape: tuple[int, int], valid: jax.Array) -> jax.Array:
    """Flat indices into [R, N] tokens listing each row's first `valid[r]` tokens, row after row, then the
    rest: a tower's padded rows in the order their placeholders take them."""
    n = jnp.arange(shape[1])
    is_valid = (n[None, :] < valid[:, None]).reshape(-1)
    return jnp.argsort(~is_valid, stable=True)
