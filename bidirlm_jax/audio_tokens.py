"""How many tokens the AuT audio encoder (Qwen3-ASR's, BidirLM-Omni's) makes from L mel frames.

Pure integer arithmetic, below both the tower (`models.towers.qwen3_asr`, which sizes its static shapes
with it) and the data path (`data.media.audio`, which sizes placeholder runs with it): neither imports
the other. Works elementwise on Python ints, numpy and jax integer arrays alike.

The encoder cuts a clip into chunks of `2·n_window` frames and runs three stride-2 convolutions
(kernel 3, padding 1) on each, so a chunk of n frames becomes `conv_len(n)` tokens and a clip
`chunk_tokens(L)`: the number of features the tower produces. BidirLM-Omni's released processor
instead applies the three-stage formula to the whole clip (`release_tokens`), which counts fewer
tokens unless `2·n_window` is a multiple of 8 (n_window 100: 200/8 = 25 per chunk). Where the two
differ the release keeps only the first `release_tokens(L)` features; a caller that reproduces it
must say so and count the difference (never drop it silently).

Static counts for the host: `chunk_bucket` (chunks per padded row, chunks per batch) and `chunk_ids` (which
chunks of a padded batch hold frames).
"""

from __future__ import annotations

import numpy as np


def conv_len(frames):
    """Tokens out of one chunk of `frames` frames: three times ⌊(n − 1)/2⌋ + 1 (0 for an empty chunk)."""
    for _ in range(3):
        frames = (frames - 1) // 2 + 1
    return frames


def chunk_tokens(frames, n_window: int):
    """Tokens the tower makes from a clip of `frames` mel frames: `conv_len(2·n_window)` per full chunk
    plus `conv_len` of the tail. (transformers' `_get_feat_extract_output_lengths` writes 13 for
    `conv_len(2·n_window)`, which is right for n_window 50 only.)"""
    chunk = 2 * n_window
    return (frames // chunk) * conv_len(chunk) + conv_len(frames % chunk)


def release_tokens(frames):
    """BidirLM-Omni's placeholder count for a clip: `conv_len` of the whole clip (its processor and
    remote code); equal to `chunk_tokens` only when `2·n_window` is a multiple of 8."""
    return conv_len(frames)


def chunk_bucket(chunks: int) -> int:
    """A static count for `chunks` chunks: a power of two or three quarters of one (1, 2, 3, 4, 6, 8, 12, …), at
    most 1.5× the need (a power of two alone wastes up to 2×), so a few compiled shapes cover every batch."""
    n = 1 << max(chunks - 1, 0).bit_length()
    return 3 * n // 4 if n >= 4 and 3 * n // 4 >= chunks else n


def chunk_ids(lengths, frames: int, chunk_frames: int):
    """Host side: the flat ids (`clip · chunks + k`) of the chunks that hold frames, for clips of `lengths`
    frames in rows of `frames` (`chunks` = ⌈frames / chunk_frames⌉ per row), padded with the out-of-range id
    `clips · chunks` to a `chunk_bucket` count. The tower runs its stem on these chunks only (`AudioEncoder`'s
    `chunk_ids`): a row padded to the batch's longest clip holds chunks without a frame, which transformers'
    encoder never computes either."""
    lengths = np.asarray(lengths, np.int64)
    chunks = -(-frames // chunk_frames)
    starts = np.arange(chunks) * chunk_frames
    ids = np.flatnonzero(starts[None, :] < lengths[:, None]).astype(np.int32)
    total = len(lengths) * chunks
    size = min(chunk_bucket(max(len(ids), 1)), total)
    return np.concatenate([ids, np.full(size - len(ids), total, np.int32)])
