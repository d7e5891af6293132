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
- Packed batches (`packed_batches`) hold several texts per row back to back, so no FLOP goes to padding
  between texts: each row's length is the bucket of the longest text that opens it, shorter texts fill the
  gaps (best fit, longest first), and rows of one length form batches of `rows` rows (the last of each
  length: the power of two that holds it), so a jitted function still sees a handful of shapes (fewer with
  `min_length`, the shortest row: short texts share longer rows instead of opening rows of their own). A text
  is segment k + 1 of its batch (k its index there), with positions restarting at 0: a model given
  `segment_ids` and `positions` computes each text as if alone (`models.encoder`). A filler row holds one
  token of segment `num_texts + 1`, which pools into nothing.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bidirlm_jax.io.tokenizer import pad_id

MIN_BUCKET = 16
# Packed rows are at least this long (`row_floor`): texts shorter than it share rows of one length, so a call
# compiles few shapes (each costs a trace and a compile, or a cache read, on the first call), while attention
# over a row this long is still a small part of a token's FLOPs (`benchmarks/first_call.py`).
PACKED_ROW_MIN = 128

__all__ = [
    "MIN_BUCKET",
    "PACKED_ROW_MIN",
    "PackedBatch",
    "bucket_for",
    "bucket_lengths",
    "pack_rows",
    "row_floor",
    "packed_batches",
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


def pack_rows(lengths: Sequence[int], buckets: Sequence[int]) -> list[tuple[int, list[int]]]:
    """Texts of `lengths` tokens (each within the largest bucket) → rows `(length, [text, ...])`: longest
    text first, each into the fullest row it fits (best fit), else a new row of its own bucket length."""
    free: list[tuple[int, int]] = []  # (free tokens, row), sorted
    rows: list[tuple[int, list[int]]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, r = free.pop(at)
        else:
            r = len(rows)
            room = bucket_for(max(n, 1), buckets)
            rows.append((room, []))
        rows[r][1].append(i)
        bisect.insort(free, (room - n, r))
    return rows


@dataclass(frozen=True)
class PackedBatch:
    """One packed batch: `inputs` int32 [rows, length] (`input_ids`, `attention_mask`, `segment_ids`,
    `positions`); `texts[k]` is the caller's index of segment k + 1, starting at token `places[k]`
    (row, offset); `num_texts` (>= len(texts), a power of two, equal across the call's batches of one shape) is
    the static size to pool into."""

    texts: list[int]
    places: list[tuple[int, int]]
    inputs: dict[str, np.ndarray]
    num_texts: int


def row_floor(seqs: Sequence[Sequence[int]], rows: int) -> int:
    """`packed_batches`' `min_length` for `seqs` in batches of `rows` rows: `PACKED_ROW_MIN`, or less where
    that many tokens fill the rows (a single query stays one row of its own bucket, not 128 tokens of compute)."""
    return min(PACKED_ROW_MIN, -(-sum(map(len, seqs)) // rows))


def packed_batches(
    seqs: Sequence[Sequence[int]], *, rows: int, buckets: Sequence[int], pad: int, min_length: int = 0
) -> list[PackedBatch]:
    """`seqs` packed into batches of at most `rows` rows (see the module doc). Rows are at least the bucket
    that holds `min_length` tokens: short texts then share longer rows, and a call compiles fewer shapes."""
    floor = bucket_for(min(max(min_length, 1), buckets[-1]), buckets)
    by_length: dict[int, list[list[int]]] = {}
    for length, members in pack_rows([len(s) for s in seqs], [b for b in buckets if b >= floor]):
        by_length.setdefault(length, []).append(members)
    cut = [
        (length, by_length[length][lo : lo + rows])
        for length in sorted(by_length, reverse=True)
        for lo in range(0, len(by_length[length]), rows)
    ]
    shape = lambda length, members: (min(rows, 1 << (len(members) - 1).bit_length()), length)
    widest: dict[tuple[int, int], int] = {}  # one num_texts per batch shape, so one program per shape
    for length, members in cut:
        key = shape(length, members)
        widest[key] = max(widest.get(key, 0), sum(map(len, members)))
    out = []
    for length, members in cut:
        height, _ = key = shape(length, members)
        out.append(_batch(seqs, members, height, length, pad, 1 << max(widest[key] - 1, 0).bit_length()))
    return out


def _batch(seqs, members: list[list[int]], height: int, length: int, pad: int, num_texts: int) -> PackedBatch:
    texts, places, built = [], [], []
    for r, row in enumerate(members):
        offsets = np.cumsum([0] + [len(seqs[i]) for i in row])[:-1]
        built.append(
            packed_row([np.asarray(seqs[i], np.int64) for i in row], length, pad, first_segment=len(texts) + 1)
        )
        places.extend((r, int(o)) for o in offsets)
        texts.extend(row)
    filler = packed_row([np.full(1, pad)], length, pad, first_segment=num_texts + 1)
    built += [filler] * (height - len(members))
    inputs = {k: np.stack([row[k] for row in built]) for k in built[0]}
    return PackedBatch(texts, places, inputs, num_texts)
