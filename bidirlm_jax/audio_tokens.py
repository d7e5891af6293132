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
"""

from __future__ import annotations


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
