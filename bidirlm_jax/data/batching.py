"""Token sequences → fixed-shape batches: tokenising with cut counting, length buckets, padding, the pad id,
and rows that hold several sequences back to back — written once for every path (contrastive pairs,
`encode`, fine-tuning rows and evaluation, MNTP packing and evaluation).

- Buckets (`bucket_lengths`): powers of two from `MIN_BUCKET` to 64, and above 64 also the 1.5x steps
  between them (96, 192, 384, ...), then the maximum, so a jitted function compiles a handful of shapes
  and a padded batch wastes at most a third of its compute.
- Padding is on the right; its token is `pad_id(tokenizer)` (the tokenizer's pad, else eos, else 0). Every
  padding token is masked out, so the id only has to be a valid row of the embedding.
- A batch short of rows is filled with copies of its first sequence (dropped after), never with an
  all-padding row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from bidirlm_jax.io.tokenizer import pad_id

MIN_BUCKET = 16

__all__ = [
    "MIN_BUCKET",
    "bucket_for",
    "bucket_lengths",
    "packed_row",
    "pad_batch",
    "pad_id",
    "pad_rows",
    "tokenize",
]


def bucket_lengths(max_length: int) -> tuple[int, ...]:
    """Padded lengths batches may take, then `max_length` (see the module doc)."""
    lengths, n = [], MIN_BUCKET
    while n < max_length:
        lengths.append(n)
        if n >= 64 and n * 3 // 2 < max_length:
            lengths.append(n * 3 // 2)
        n *= 2
    return (*lengths, max_length)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `length` tokens."""
    return next(b for b in buckets if b >= length)


def pad_rows(
    seqs: Sequence[Sequence[int]], length: int, pad: int, *, rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`seqs` right-padded to `length`: ids and attention mask, int32 [rows, length]; rows past `len(seqs)`
    (`rows` defaults to it) are copies of the first sequence."""
    rows = len(seqs) if rows is None else rows
    ids = np.full((rows, length), pad, np.int32)
    mask = np.zeros((rows, length), np.int32)
    for r in range(rows):
        seq = seqs[r] if r < len(seqs) else seqs[0]
        ids[r, : len(seq)] = seq
        mask[r, : len(seq)] = 1
    return ids, mask


def pad_batch(seqs: list[list[int]], rows: int, buckets: tuple[int, ...], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """`pad_rows` to the smallest bucket that holds the longest of `seqs`."""
    return pad_rows(seqs, bucket_for(max(len(s) for s in seqs), buckets), pad, rows=rows)


def packed_row(pieces: Sequence[np.ndarray], length: int, pad: int, *, first_segment: int = 1) -> dict[str, np.ndarray]:
    """Sequences back to back in one row of `length` tokens, int32: `input_ids` (padding `pad`),
    `segment_ids` (`first_segment`, `first_segment + 1`, ... per piece, 0 for padding), `positions`
    (restarting at 0 for each piece) and `attention_mask`."""
    lengths = np.array([len(p) for p in pieces], np.int64)
    fill = length - int(lengths.sum())
    segment_ids = np.repeat(np.arange(first_segment, first_segment + len(pieces)), lengths)
    positions = np.arange(len(segment_ids)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    row = {
        "input_ids": np.concatenate([*(np.asarray(p) for p in pieces), np.full(fill, pad)]),
        "segment_ids": np.pad(segment_ids, (0, fill)),
        "positions": np.pad(positions, (0, fill)),
        "attention_mask": np.pad(np.ones(len(segment_ids)), (0, fill)),
    }
    return {k: v.astype(np.int32) for k, v in row.items()}


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> tuple[list[list[int]], int]:
    """Token ids of each text, cut to `max_length` as transformers truncates (special tokens kept), and how
    many needed cutting. Only the long texts are tokenised a second time."""
    ids = tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    long = [i for i, seq in enumerate(ids) if len(seq) > max_length]
    if long:
        cut = tokenizer([texts[i] for i in long], add_special_tokens=True, truncation=True, max_length=max_length)
        for i, seq in zip(long, cut["input_ids"]):
            ids[i] = seq
    return ids, len(long)
