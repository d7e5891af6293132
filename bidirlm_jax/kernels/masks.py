"""The mask interface every attention kernel reads: a band (`MaskSpec`) and a call's `Segments`, never a
dense `[B, 1, T, T]` mask.

A `MaskSpec` says which keys a query may see by their distance (a band `(left, right)`, inclusive;
causal attention is `right = 0`). `Segments` say which tokens are real and which segment (a document of
a packed row, an image of a vision row, a chunk of an audio row) each belongs to. Together they are the
whole mask:

- padding keys are never attended;
- with segment ids, tokens only see their own segment, so a block-diagonal mask is a segment mask and
  every kernel runs it (`Segments.per_item`, `Segments.blocks`);
- a padding query attends to the keys a real query at its place would see, and to itself, so its
  softmax is never empty; its output is padding and never read.

Kernels that take segment ids see padding as segments of their own (`Segments.kernel_ids`: one id per
padding token that no real token has): they agree with `dense_mask` on every real query, and their
padding queries attend to themselves only. `dense_mask` is the one function that builds a boolean mask
(the reference and the XLA kernels call it, on the whole sequence or on blocks of it). Which band a
model's layer runs under is the model's business (`models.masks`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from bidirlm_jax.errors import ConfigError


@dataclass(frozen=True)
class MaskSpec:
    """Query i may see key j when `i - left <= j <= i + right`; None leaves that side unbounded.

    Static (hashable): kernels are built from it at trace time. `(None, 0)` is causal attention,
    `(W - 1, 0)` causal sliding, `(w, w)` a symmetric band, `(None, None)` full bidirectional attention.
    """

    left: int | None = None
    right: int | None = None

    @property
    def causal(self) -> bool:
        return self.right == 0

    @property
    def banded(self) -> bool:
        """Whether a window bounds the keys on the left (a sliding layer)."""
        return self.left is not None

    def band(self, i: jax.Array, j: jax.Array) -> jax.Array:
        """Whether query positions `i` may see key positions `j` (broadcasting), ignoring segments and padding."""
        ok = jnp.ones(jnp.broadcast_shapes(jnp.shape(i), jnp.shape(j)), bool)
        if self.left is not None:
            ok = ok & (i - j <= self.left)
        if self.right is not None:
            ok = ok & (j - i <= self.right)
        return ok


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Segments:
    """Per call: `valid` [B, T] bool (real tokens) and `ids` [B, T] int32 (documents of packed rows) or None.

    `padded` is static: False when the caller gave no attention mask, so kernels can skip padding.
    """

    valid: jax.Array
    ids: jax.Array | None
    padded: bool = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def of(cls, attention_mask, segment_ids, shape: tuple[int, int]) -> Segments:
        """From the model's inputs (either may be None)."""
        valid = jnp.ones(shape, bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        ids = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
        return cls(valid, ids, attention_mask is not None)

    @classmethod
    def per_item(cls, lengths, length: int) -> Segments:
        """One segment per item of rows that hold items back to back (a ViT row of several images, each
        attending within itself): `lengths` [B, N] tokens per item; tokens past a row's items are padding."""
        lengths = jnp.asarray(lengths, jnp.int32)
        if lengths.ndim != 2:
            raise ConfigError(f"item lengths must be [rows, items], got shape {lengths.shape}")
        ends = jnp.cumsum(lengths, axis=1)  # [B, N] one past each item's last token
        t = jnp.arange(length, dtype=jnp.int32)
        ids = jnp.sum(t[None, :, None] >= ends[:, None, :], axis=2, dtype=jnp.int32)  # items ending before t
        return cls(t[None, :] < ends[:, -1:], ids, True)

    @classmethod
    def blocks(cls, shape: tuple[int, int], block: int, attention_mask=None) -> Segments:
        """Fixed blocks of `block` tokens from the start of each row (an audio encoder attending within
        chunks of frames); `attention_mask` [B, T] marks real tokens as in `of`."""
        if block <= 0:
            raise ConfigError(f"block size must be positive, got {block}")
        ids = jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32) // block, shape)
        return cls.of(attention_mask, ids, shape)

    @property
    def masked(self) -> bool:
        """Whether anything beyond the band restricts attention (padding or packed documents)."""
        return self.padded or self.ids is not None

    def kernel_ids(self) -> jax.Array:
        """[B, T] int32 segment ids for kernels: documents as given (0 without `ids`), each padding token
        a segment of its own (an id below every real one), so no query row is ever empty."""
        t = self.valid.shape[1]
        ids = jnp.zeros(self.valid.shape, jnp.int32) if self.ids is None else self.ids
        floor = jnp.minimum(jnp.min(ids), 0)
        return jnp.where(self.valid, ids, floor - 1 - jnp.arange(t, dtype=jnp.int32))

    def lengths(self) -> jax.Array:
        """[B] int32 real tokens per row (the valid prefix when the row is right-padded)."""
        return jnp.sum(self.valid, axis=1, dtype=jnp.int32)

    def right_padded(self) -> jax.Array:
        """Scalar bool: every row's real tokens form a prefix (padding, if any, only at the end)."""
        prefix = jnp.arange(self.valid.shape[1])[None, :] < self.lengths()[:, None]
        return jnp.all(prefix == self.valid)


def dense_mask(
    spec: MaskSpec, segments: Segments, q_index: jax.Array | None = None, k_index: jax.Array | None = None
) -> jax.Array:
    """Boolean `[B, 1, Tq, Tk]` (True = may attend) for query positions `q_index` and key positions
    `k_index` (default: the whole sequence); the module docstring states the rules."""
    t = segments.valid.shape[1]
    q_index = jnp.arange(t) if q_index is None else q_index
    k_index = jnp.arange(t) if k_index is None else k_index
    i, j = q_index[:, None], k_index[None, :]
    q_valid, k_valid = segments.valid[:, q_index], segments.valid[:, k_index]
    mask = k_valid[:, None, None, :] & spec.band(i, j)
    if segments.ids is not None:
        mask = mask & (segments.ids[:, q_index][:, None, :, None] == segments.ids[:, k_index][:, None, None, :])
    return mask | ((i == j) & ~q_valid[:, None, :, None])
