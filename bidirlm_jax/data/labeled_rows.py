"""Labeled splits → token ids with aligned labels, and the engine's training rows over them.

Tokenisation (`encode_split`): sequences are cut to `max_length` tokens (pairs `longest_first`), and cut
rows are counted. Token classification aligns labels from the fast tokenizer's `word_ids()`: each word's
first sub-token carries the word's tag, every other position (special tokens, later sub-tokens) carries
`IGNORE_INDEX`. Words after the first are fed with `word_separator` (a space) in front, so each word
gets the tokens it has inside running text ("ĠParis" rather than a sentence-initial "Paris"); words cut
by `max_length` are counted and left out of the metrics.

`TrainRows` turns an encoded split into the engine's endless rows (`objectives.base.Objective.rows`):
row `i` is example `perm_e[i mod N]` of epoch `e = i // N`, each epoch its own permutation of
`(seed, epoch)`, every row padded on the right to `seq_len`.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bidirlm_jax.data.batching import pad_rows
from bidirlm_jax.data.labeled import LabeledSplit, LabelMap, check_labels
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models.heads import IGNORE_INDEX

_CHUNK = 1024  # texts per tokenizer call


@dataclass
class Encoded:
    """A tokenised split, ragged: example i's tokens are `ids[offsets[i]:offsets[i+1]]`.

    Sequence tasks: `labels` [N] (int32 class ids, float32 targets). Token classification: `labels` is
    flat like `ids` (a class id on each word's first sub-token, `IGNORE_INDEX` elsewhere), and
    `word_labels[i]` / `word_starts[i]` give every word's class id and first-token position (-1 when the
    word was cut by `max_length` or produced no token).
    """

    task: str
    ids: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray
    num_truncated: int = 0  # examples cut to max_length
    word_labels: list[np.ndarray] | None = None
    word_starts: list[np.ndarray] | None = None
    num_dropped_words: int = 0  # words without a token (cut, or empty)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, i: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
        """Example `i` right-padded to `seq_len`: `input_ids`, `attention_mask` and `labels`."""
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        n = stop - start
        if n > seq_len:
            raise ConfigError(
                f"example {i} has {n} tokens, more than the rows' {seq_len}; encode with max_length<={seq_len}"
            )
        (ids,), (mask,) = pad_rows([self.ids[start:stop]], seq_len, pad_id)
        if self.task == "token_classification":
            labels = pad_rows([self.labels[start:stop]], seq_len, IGNORE_INDEX)[0][0]
        else:
            labels = self.labels[i]
        return {"input_ids": ids, "attention_mask": mask, "labels": np.asarray(labels)}


def _ragged(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(rows) + 1, np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    ids = np.fromiter((t for r in rows for t in r), np.int32, count=int(offsets[-1]))
    return ids, offsets


def _encode_sequences(split: LabeledSplit, tokenizer, max_length: int) -> tuple[list[list[int]], int]:
    rows: list[list[int]] = []
    truncated = 0
    for lo in range(0, len(split), _CHUNK):
        texts = split.texts[lo : lo + _CHUNK]
        pairs = split.pairs[lo : lo + _CHUNK] if split.pairs is not None else None
        ids = tokenizer(texts, pairs, truncation=False, verbose=False)["input_ids"]
        long = [i for i, r in enumerate(ids) if len(r) > max_length]
        if long:  # cut only those (pairs: the longer text first, as transformers' `longest_first`)
            cut = tokenizer(
                [texts[i] for i in long],
                [pairs[i] for i in long] if pairs is not None else None,
                truncation=True,
                max_length=max_length,
                verbose=False,
            )["input_ids"]
            for i, r in zip(long, cut):
                ids[i] = r
            truncated += len(long)
        rows.extend(ids)
    return rows, truncated


def _encode_words(split: LabeledSplit, tokenizer, label_map: LabelMap, max_length: int, separator: str):
    rows, flat_labels, word_labels, word_starts = [], [], [], []
    truncated = dropped = 0
    for lo in range(0, len(split), _CHUNK):
        words = [[w if j == 0 else separator + w for j, w in enumerate(s)] for s in split.tokens[lo : lo + _CHUNK]]
        enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length, verbose=False)
        for k, ids in enumerate(enc["input_ids"]):
            i = lo + k
            tags = np.asarray(
                [label_map.id(t, f"{split.name} split, {split.where[i]}") for t in split.labels[i]], np.int32
            )
            starts = np.full(len(tags), -1, np.int64)
            labels = np.full(len(ids), IGNORE_INDEX, np.int32)
            for pos, word in enumerate(enc.word_ids(k)):
                if word is not None and starts[word] < 0:
                    starts[word] = pos
                    labels[pos] = tags[word]
            missing = int(np.sum(starts < 0))
            dropped += missing
            truncated += int(missing > 0 and len(ids) == max_length)
            rows.append(ids)
            flat_labels.append(labels)
            word_labels.append(tags)
            word_starts.append(starts)
    return rows, flat_labels, word_labels, word_starts, truncated, dropped


def encode_split(
    split: LabeledSplit, tokenizer, label_map: LabelMap, *, max_length: int, word_separator: str = " "
) -> Encoded:
    """Tokenise a split (fast tokenizer) and map its labels to ids; see the module doc."""
    if max_length < 2:
        raise ConfigError(f"max_length={max_length} leaves no room for text; use data.seq_len >= 2")
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("fine-tuning needs a fast tokenizer (a tokenizer.json): word alignment uses its word_ids()")
    check_labels(split, label_map)
    if split.task == "token_classification":
        rows, flat, word_labels, word_starts, truncated, dropped = _encode_words(
            split, tokenizer, label_map, max_length, word_separator
        )
        ids, offsets = _ragged(rows)
        labels = np.concatenate(flat).astype(np.int32) if flat else np.zeros(0, np.int32)
        return Encoded(split.task, ids, offsets, labels, truncated, word_labels, word_starts, dropped)
    rows, truncated = _encode_sequences(split, tokenizer, max_length)
    empty = next((i for i, r in enumerate(rows) if not r), None)
    if empty is not None:  # a row without a real token has no attention to compute (NaN), nothing to pool
        raise ConfigError(f"{split.name} split, {split.where[empty]}: the text gives no token; drop or fill it")
    ids, offsets = _ragged(rows)
    if split.task == "regression":
        labels = np.asarray(split.labels, np.float32)
    else:
        labels = np.asarray(
            [label_map.id(v, f"{split.name} split, {w}") for v, w in zip(split.labels, split.where)], np.int32
        )
    return Encoded(split.task, ids, offsets, labels, truncated)


# --- training rows --------------------------------------------------------------------------------


class TrainRows:
    """The engine's endless training rows over an encoded split (see the module doc)."""

    def __init__(self, encoded: Encoded, *, seq_len: int, pad_id: int, seed: int):
        if len(encoded) == 0:
            raise ConfigError("the training split holds no examples")
        self._encoded, self._seq_len, self._pad, self._seed = encoded, seq_len, pad_id, seed
        self._order = functools.lru_cache(maxsize=2)(self._permutation)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self._seed, epoch)).permutation(len(self._encoded))

    def __len__(self) -> int:
        return sys.maxsize  # endless: every epoch reshuffles

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        epoch, position = divmod(int(index), len(self._encoded))
        return self._encoded.row(int(self._order(epoch)[position]), self._seq_len, self._pad)
