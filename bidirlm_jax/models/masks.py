"""Attention masks as descriptions, which kernels read directly instead of a dense `[B, 1, T, T]` mask.

A layer type's `MaskSpec` says which keys a query may see by their distance (a band `(left, right)`,
inclusive; causal attention is `right = 0`). A call's `Segments` says which tokens are real and which
document of a packed row each belongs to. Together they are the whole mask:

- padding keys are never attended;
- with `segment_ids`, tokens only see their own segment (in both modes);
- causal: key index ≤ query index; a causal sliding layer also needs `i - j < W` (transformers);
- bidirectional sliding layers, by `bidirectional_window`:
  `"half"` |i−j| ≤ W//2 (transformers' `Gemma3TextConfig(use_bidirectional_attention=True)`),
  `"full"` |i−j| ≤ W (transformers' generic `is_causal=False`), `"none"` no window;
- a padding query attends to the keys a real query at its place would see, and to itself, so its
  softmax is never empty; its output is padding and never read.

Kernels that take segment ids see padding as segments of their own (`Segments.kernel_ids`: one id per
padding token that no real token has): they agree with `dense_mask` on every real query, and their
padding queries attend to themselves only. `dense_mask` is the one function that builds a boolean mask
(the reference and the XLA kernels call it, on the whole sequence or on blocks of it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from bidirlm_jax.models.config import SLIDING, ModelConfig


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


def mask_spec(config: ModelConfig, layer_type: str) -> MaskSpec:
    """The band of one layer type under the config's attention mode and bidirectional window."""
    causal = config.attention == "causal"
    if layer_type != SLIDING:
        return MaskSpec(None, 0 if causal else None)
    w = config.sliding_window
    if causal:
        return MaskSpec(w - 1, 0)  # i - j < W
    half = {"half": w // 2, "full": w, "none": None}[config.bidirectional_window]
    return MaskSpec(half, half)


def layer_specs(config: ModelConfig) -> dict[str, MaskSpec]:
    """`{layer_type: MaskSpec}` for the layer types present, in order of first appearance."""
    return {lt: mask_spec(config, lt) for lt in dict.fromkeys(config.layer_types)}


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
