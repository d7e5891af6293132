"""Host-side (numpy) layout of image patches for the vision tower: rows of images back to back.

A row holds the patches of one or more images (each `t·h·w` patches in 2 × 2 merge-block order, as the
processor emits them) and is padded to a static length. For every patch the layout gives its (row, col)
in its image (the 2-D rotary coordinates), the four taps and weights that resample the learned square
position table to the image's grid (bilinear, `align_corners=True`), and for every row the lengths of its
attention segments (one per frame: transformers' `cu_seqlens`). Computed in numpy because it depends on
the grids' values, not only their shapes; the arithmetic follows transformers' `vision_utils` in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import numpy as np

from bidirlm_jax.errors import ConfigError

Grid = tuple[int, int, int]  # (t, h, w) in patches


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class VisionLayout:
    """Per-patch host arrays for rows of `length` patches (padding: coordinates 0, weights 0)."""

    coords: np.ndarray  # [B, P, 2] int32 (row, col) of each patch in its image
    interp_index: np.ndarray  # [B, P, 4] int32 rows of the flattened position table
    interp_weight: np.ndarray  # [B, P, 4] float32 bilinear weights
    lengths: np.ndarray  # [B, M] int32 patches of each attention segment (one per frame), zeros past a row's last


def block_order_coords(grid: Grid, merge: int) -> np.ndarray:
    """[t·h·w, 2] (row, col) of each patch in merge-block order (blocks row-major, then within a block),
    repeated over the t frames."""
    t, h, w = grid
    if h % merge or w % merge:
        raise ConfigError(f"image grid {grid} is not a multiple of the spatial merge size {merge} in h and w")
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    rows = rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    cols = cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([rows, cols], axis=-1), (t, 1)).astype(np.int32)


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Two taps into a `side`-long table and their weights for target positions `index` on an axis of
    `size` (align_corners: position i samples i·(side−1)/(size−1)); fp32 as `F.interpolate` computes it."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2, dtype=np.float32)
    taps = np.clip(floor[:, None] + offsets, 0, side - 1).astype(np.int32)
    weights = np.maximum(np.float32(1) - np.abs(src[:, None] - floor[:, None] - offsets), np.float32(0))
    return taps, weights


def interpolation(coords: np.ndarray, grid: Grid, side: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, 4] indices into the flattened `side × side` position table and [n, 4] weights for patches at
    `coords` of an image of `grid`; taps ordered (top-left, top-right, bottom-left, bottom-right)."""
    h_taps, h_weights = _axis_taps(coords[:, 0], grid[1], side)
    w_taps, w_weights = _axis_taps(coords[:, 1], grid[2], side)
    index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weight = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
    return index.astype(np.int32), weight.astype(np.float32)


def _as_grids(row: Sequence) -> list[Grid]:
    grids = [tuple(int(v) for v in g) for g in np.asarray(row, np.int64).reshape(-1, 3)]
    if any(min(g) <= 0 for g in grids):
        raise ConfigError(f"image grids must be positive (t, h, w), got {grids}")
    return grids


def vision_layout(rows: Sequence[Sequence[Grid]], length: int | None = None, *, merge: int, side: int) -> VisionLayout:
    """The layout of rows holding the images of `rows[b]` (grids (t, h, w)) back to back, padded to
    `length` patches (default: the longest row; every image is a whole number of merged tokens)."""
    rows = [_as_grids(r) for r in rows]
    counts = [sum(t * h * w for t, h, w in r) for r in rows]
    length = max(counts, default=0) if length is None else length
    if length % (merge * merge) or max(counts, default=0) > length:
        raise ConfigError(
            f"rows of {counts} patches do not fit rows of {length} (a multiple of {merge * merge} patches is needed)"
        )
    segments = max((sum(t for t, _, _ in r) for r in rows), default=0)
    out = VisionLayout(
        coords=np.zeros((len(rows), length, 2), np.int32),
        interp_index=np.zeros((len(rows), length, 4), np.int32),
        interp_weight=np.zeros((len(rows), length, 4), np.float32),
        lengths=np.zeros((len(rows), max(segments, 1)), np.int32),
    )
    for b, grids in enumerate(rows):
        start, seg = 0, 0
        for grid in grids:
            t, h, w = grid
            coords = block_order_coords(grid, merge)
            index, weight = interpolation(coords, grid, side)
            stop = start + t * h * w
            out.coords[b, start:stop], out.interp_index[b, start:stop], out.interp_weight[b, start:stop] = (
                coords,
                index,
                weight,
            )
            out.lengths[b, seg : seg + t] = h * w
            start, seg = stop, seg + t
    return out
