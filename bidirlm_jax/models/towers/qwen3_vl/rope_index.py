"""Qwen3-VL's M-RoPE positions `[3, B, T]` (temporal, height, width), computed on the host as
transformers' `Qwen3VLModel.get_rope_index` computes them.

Over each row's real tokens (padding, on either side, gets 0): a run of text tokens counts on from the
current position on all three rows; a run of image placeholders with grid (t, h, w) patches becomes
its merged grid (t, h/m, w/m), each token at (cur + t_i, cur + h_i, cur + w_i), and the current position
then moves on by max(h, w)/m. Images are taken from `image_grid_thw` in order, row after row. Runs are
found from `input_ids` (transformers 5.24 takes them as `mm_token_type_ids`, which its processor derives
the same way); only images are handled (no videos).
"""

from __future__ import annotations

import itertools

import numpy as np

from bidirlm_jax.errors import ConfigError


def _runs(is_image: np.ndarray) -> list[tuple[bool, int, int]]:
    """(is an image run, start, stop) of each maximal run of equal flags."""
    runs, start = [], 0
    for flag, group in itertools.groupby(is_image.tolist()):
        n = len(list(group))
        runs.append((bool(flag), start, start + n))
        start += n
    return runs


def get_rope_index(
    input_ids, image_grid_thw=None, attention_mask=None, *, image_token_id: int, spatial_merge_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(positions [3, B, T] int64, deltas [B, 1]: each row's largest position + 1 − its real token count)."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ConfigError(f"input_ids must be [batch, length], got shape {ids.shape}")
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = iter(np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw, np.int64))
    m = spatial_merge_size
    positions = np.zeros((3, *ids.shape), np.int64)
    deltas = np.zeros((ids.shape[0], 1), np.int64)
    for b in range(ids.shape[0]):
        row = ids[b][mask[b]]
        parts, cur = [], 0
        for is_image, start, stop in _runs(row == image_token_id):
            if not is_image:
                parts.append(np.broadcast_to(np.arange(stop - start) + cur, (3, stop - start)))
                cur += stop - start
                continue
            grid = next(grids, None)
            if grid is None:
                raise ConfigError(f"row {b} has more runs of image placeholders than image_grid_thw has images")
            t, h, w = (int(v) for v in grid)
            if t * (h // m) * (w // m) != stop - start:
                raise ConfigError(
                    f"row {b}: a run of {stop - start} image placeholders for an image of grid {(t, h, w)}, which "
                    f"has {t * (h // m) * (w // m)} tokens; expand each image's placeholders as the processor does"
                )
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h // m), np.arange(w // m), indexing="ij")
            parts.append(np.stack([tt, hh, ww]).reshape(3, -1) + cur)
            cur += max(h, w) // m
        if parts:
            row_positions = np.concatenate(parts, axis=1)
            positions[:, b, mask[b]] = row_positions
            deltas[b, 0] = row_positions.max() + 1 - len(row)
    if next(grids, None) is not None:
        raise ConfigError("image_grid_thw has more images than the input_ids have runs of image placeholders")
    return positions, deltas
