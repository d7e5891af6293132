"""Corpus documents → token ids, as the tokenizer encodes them, in this process or a pool of workers.

Only `tokenizers` is needed (the tokenizer travels as its JSON), so spawned workers start fast. A document
of special tokens only is dropped, and `Encoded` keeps how many source documents each kept one accounts
for, so the shard writer (`data.corpus_shards`) can resume at an exact source position.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer

from bidirlm_jax.data.manifest import tokenizer_record
from bidirlm_jax.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclasses.dataclass
class Encoded:
    tokens: np.ndarray  # uint32: the kept documents' ids, concatenated
    lengths: np.ndarray  # int64: one per kept document
    read_through: np.ndarray  # int64: per kept document, the documents read up to it (itself included)
    num_read: int  # documents read, kept or skipped

    def split(self, n: int) -> tuple[Encoded, Encoded]:
        """The first `n` kept documents (with the skipped ones before them), and the rest."""
        cut, read = int(self.lengths[:n].sum()), int(self.read_through[n - 1])
        head = Encoded(self.tokens[:cut], self.lengths[:n], self.read_through[:n], read)
        return head, Encoded(self.tokens[cut:], self.lengths[n:], self.read_through[n:] - read, self.num_read - read)


class Encoder:
    """Encodes chunks of texts as the tokenizer does with `add_special_tokens=True`; needs only `tokenizers`."""

    def __init__(self, tokenizer_json: str, special_ids: Sequence[int]):
        self.backend = Tokenizer.from_str(tokenizer_json)
        self.backend.no_truncation()
        self.backend.no_padding()
        self.special_ids = np.asarray(special_ids, np.int64)

    @staticmethod
    def args(tokenizer: PreTrainedTokenizerBase) -> tuple[str, list[int]]:
        return tokenizer.backend_tokenizer.to_str(), tokenizer_record(tokenizer)["special_ids"]

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> Encoder:
        return cls(*cls.args(tokenizer))

    def __call__(self, texts: list[str]) -> Encoded:
        encodings = self.backend.encode_batch(texts, add_special_tokens=True)
        lengths = np.array([len(e.ids) for e in encodings], np.int64)
        ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), np.int64, count=int(lengths.sum()))
        if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.uint32).max):
            raise ConfigError(f"the tokenizer produced id {ids.min() if ids.min() < 0 else ids.max()}, outside uint32")
        plain = np.concatenate([[0], np.cumsum(~np.isin(ids, self.special_ids))])
        ends = np.cumsum(lengths)
        keep = plain[ends] - plain[ends - lengths] > 0  # at least one non-special token
        tokens = ids[np.repeat(keep, lengths)].astype(np.uint32)
        return Encoded(tokens, lengths[keep], np.flatnonzero(keep) + 1, len(texts))


_worker_encoder: Encoder | None = None


def _start_worker(tokenizer_json: str, special_ids: list[int]) -> None:
    global _worker_encoder
    _worker_encoder = Encoder(tokenizer_json, special_ids)


def _encode_in_worker(texts: list[str]) -> Encoded:
    return _worker_encoder(texts)


@contextlib.contextmanager
def encoding(
    encoder_args: tuple[str, list[int]], num_workers: int
) -> Iterator[Callable[[Iterable[list[str]]], Iterator[Encoded]]]:
    """A function mapping chunks of texts to their encodings, in order, over `num_workers` processes."""
    if num_workers <= 1:
        encoder = Encoder(*encoder_args)
        yield lambda chunks: map(encoder, chunks)
        return
    # spawn, not fork: the parent may hold JAX's threads. A bounded window keeps memory flat on huge corpora.
    with multiprocessing.get_context("spawn").Pool(num_workers, _start_worker, encoder_args) as pool:

        def encode(chunks: Iterable[list[str]]) -> Iterator[Encoded]:
            pending: deque = deque()
            for chunk in chunks:
                pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
                if len(pending) >= 4 * num_workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()

        yield encode


def chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk
