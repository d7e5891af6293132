"""Rotary position tables: 1-D RoPE over `[B, T]` positions and Qwen3-VL's interleaved M-RoPE over
`[3, B, T]` (temporal, height, width) positions.

M-RoPE gives each rotary frequency j one axis (transformers' `Qwen3VLTextRotaryEmbedding`): H where
j ≡ 1 (mod 3) and j < 3·s_H, W where j ≡ 2 (mod 3) and j < 3·s_W, T elsewhere, for `mrope_section`
(s_T, s_H, s_W). Every frequency multiplies its own axis' position exactly as 1-D RoPE multiplies the
one position, so text, whose three rows are equal, gets 1-D RoPE's tables bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models.config import Rope


def mrope_axes(section: Sequence[int], half: int) -> np.ndarray:
    """The axis (0 = T, 1 = H, 2 = W) each of the `half` rotary frequencies takes, interleaved."""
    axes = np.zeros(half, np.int32)
    for axis in (1, 2):
        axes[axis : 3 * section[axis] : 3] = axis
    return axes


def rope_tables(
    positions: jax.Array, rope: Rope, head_dim: int, dtype, mrope_section: Sequence[int] | None = None
) -> tuple[jax.Array, jax.Array]:
    """cos/sin of shape [B, T, head_dim] for integer `positions` [B, T], or [3, B, T] with `mrope_section`
    (linear scaling divides the frequencies)."""
    inv_freq = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    inv_freq = jnp.asarray(inv_freq / np.float32(rope.factor), jnp.float32)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    if positions.ndim == 3:
        if mrope_section is None:
            raise ConfigError(
                f"positions of shape {positions.shape} are M-RoPE's [3, B, T]; this model has no mrope_section "
                "(pass [B, T] positions, or load a config with rope_parameters.mrope_section)"
            )
        if positions.shape[0] != 3:
            raise ConfigError(f"M-RoPE positions must be [3, B, T] (temporal, height, width), got {positions.shape}")
        axes = mrope_axes(mrope_section, head_dim // 2)
        freqs = jnp.where(axes == 0, freqs[0], jnp.where(axes == 1, freqs[1], freqs[2]))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on x [B, T, heads, head_dim] (the layout transformers' checkpoints expect)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
