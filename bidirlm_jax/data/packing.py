"""Documents packed into fixed-length rows, as a grain random-access source.

Each epoch concatenates the corpus's documents in a seeded order (a new one each epoch) and cuts the
stream into rows of `seq_len` tokens. A document that does not fit continues at the start of the next
row: split, never dropped; only the last row of an epoch can hold padding. Row `i` is computed from the
cumulative document lengths (`np.searchsorted`), never by replaying earlier rows, so the rows are a pure
function of `(seed, i)`: any process can read any row, and grain's iterator state resumes them exactly.

A row (a dict of numpy arrays, `T = seq_len`):

  input_ids       int32[T]  token ids; padding holds the tokenizer's pad id
  segment_ids     int32[T]  1, 2, 3, ... for the document pieces of the row, 0 for padding
  positions       int32[T]  position within the piece, restarting at 0 where each piece starts
  attention_mask  int32[T]  1 for tokens, 0 for padding
  maskable        bool[T]   may be masked: not a special token, not padding, not the first token of a
                            piece (which has no predecessor in the row to predict it from)

No token may attend across segments: the model takes `segment_ids`.
"""

from __future__ import annotations

import sys
import threading

import grain
import numpy as np

from bidirlm_jax.data.batching import packed_row
from bidirlm_jax.data.corpus_shards import Corpus
from bidirlm_jax.errors import ConfigError


class PackedRows:
    """Random-access source: row `i` of the packed stream; indices past one epoch read later epochs."""

    def __init__(self, corpus: Corpus, seq_len: int, *, seed: int):
        if seq_len < 2:
            raise ConfigError(f"data.seq_len {seq_len} is too short to pack documents; use at least 2")
        if corpus.num_tokens == 0:
            raise ConfigError("the corpus holds no tokens; check data.path")
        self.corpus, self.seq_len, self.seed = corpus, seq_len, seed
        self._special_ids = np.asarray(corpus.special_ids, np.int64)
        self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        # For grain's worker processes: the lock and the order cache are rebuilt on arrival.
        return {"corpus": self.corpus, "seq_len": self.seq_len, "seed": self.seed}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["corpus"], state["seq_len"], seed=state["seed"])

    def __len__(self) -> int:
        """Rows per epoch."""
        return -(-self.corpus.num_tokens // self.seq_len)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        epoch, row = divmod(int(index), len(self))
        order, ends = self._epoch(epoch)
        start = row * self.seq_len
        stop = min(start + self.seq_len, self.corpus.num_tokens)
        pieces = []
        j = int(np.searchsorted(ends, start, side="right"))  # the first document ending after `start`
        while start < stop:
            doc_start = int(ends[j]) - int(self.corpus.lengths[order[j]])
            piece_stop = min(stop, int(ends[j]))
            pieces.append(self.corpus.document(int(order[j]))[start - doc_start : piece_stop - doc_start])
            start, j = piece_stop, j + 1
        return self._row(pieces)

    def order(self, epoch: int) -> np.ndarray:
        """The corpus's document indices in the order `epoch` packs them."""
        return self._epoch(epoch)[0]

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's document order and the token count at each document's end (neighbouring epochs cached)."""
        with self._lock:
            if epoch not in self._orders:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.corpus.num_docs)
                self._orders = {e: v for e, v in self._orders.items() if abs(e - epoch) == 1}
                self._orders[epoch] = order, np.cumsum(self.corpus.lengths[order])
            return self._orders[epoch]

    def _row(self, pieces: list[np.ndarray]) -> dict[str, np.ndarray]:
        row = packed_row(pieces, self.seq_len, self.corpus.pad_id)
        real = row["segment_ids"] > 0
        row["maskable"] = real & (row["positions"] > 0) & ~np.isin(row["input_ids"], self._special_ids)
        return row


def packed_dataset(corpus: Corpus, *, seq_len: int, seed: int, num_epochs: int | None = None) -> grain.MapDataset:
    """Packed rows of `corpus`, epoch after epoch (forever if `num_epochs` is None), each epoch reshuffled."""
    rows = PackedRows(corpus, seq_len, seed=seed)
    length = sys.maxsize if num_epochs is None else num_epochs * len(rows)
    return grain.MapDataset.range(length).map(rows.__getitem__)


def packing_efficiency(batch: dict) -> float:
    """Real tokens / all tokens of a row or batch (1.0 unless it holds the padded end of an epoch)."""
    mask = batch["attention_mask"]
    return float(mask.sum()) / mask.size
