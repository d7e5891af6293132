"""Language-model batches from a 1-D token stream, through grain.

The stream is cut into fixed-length windows (a grain random-access source), shuffled with a seed
(reshuffled each epoch) and repeated; each process takes every `process_count`-th window starting at its
index, so the processes' local batches together form exactly the global batch one process would see.
The iterator's state (a position) goes into every checkpoint, so a resumed run sees the same data.
"""

from __future__ import annotations

from pathlib import Path

import grain
import jax
import numpy as np
from jax.sharding import Mesh
from ml_collections import ConfigDict

from bidirlm_jax import sharding
from bidirlm_jax.data.synthetic import markov_tokens
from bidirlm_jax.errors import ConfigError


class TokenWindows:
    """Random-access source: window i is `tokens[i*T:(i+1)*T]` as `{"input_ids": int32[T]}`."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        start = index * self.seq_len
        return {"input_ids": np.asarray(self.tokens[start : start + self.seq_len], np.int32)}


def load_tokens(data: ConfigDict, vocab_size: int) -> np.ndarray:
    """The token stream the `data` config names: generated (`synthetic`) or a memory-mapped `.npy`."""
    if data.source == "synthetic":
        return markov_tokens(vocab_size, data.synthetic_tokens, seed=data.seed)
    path = Path(data.path)
    if not path.is_file():
        raise ConfigError(f"data.path {path} does not exist; give a .npy file holding a 1-D array of token ids")
    try:
        tokens = np.load(path, mmap_mode="r")
    except ValueError as e:
        raise ConfigError(f"data.path {path} is not a .npy array ({e}); save token ids with numpy.save") from None
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ConfigError(
            f"data.path {path} holds a {tokens.dtype} array of shape {tokens.shape}; need 1-D integer ids"
        )
    if len(tokens) and int(tokens.max()) >= vocab_size:
        raise ConfigError(f"data.path {path} has token id {int(tokens.max())} >= the model's vocab_size {vocab_size}")
    return tokens


def lm_dataset(
    tokens: np.ndarray,
    *,
    seq_len: int,
    global_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Batches `{"input_ids": int32[global_batch / process_count, seq_len]}` of this process's share."""
    source = TokenWindows(tokens, seq_len)
    if len(source) < global_batch:
        raise ConfigError(
            f"the corpus has {len(source)} windows of {seq_len} tokens, fewer than one batch of {global_batch}; "
            "use more data, a shorter data.seq_len or a smaller data.global_batch_size"
        )
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    return ds[process_index::process_count].batch(global_batch // process_count, drop_remainder=True)


class DeviceBatches:
    """Iterates global, sharded `jax.Array` batches; `.iterator` is the grain iterator checkpoints save."""

    def __init__(self, dataset: grain.MapDataset, mesh: Mesh, *, read_threads: int = 2, prefetch: int = 4):
        options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
        self.iterator = iter(dataset.to_iter_dataset(options))
        self._mesh = mesh

    def __iter__(self) -> DeviceBatches:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        local = next(self.iterator)
        return {
            k: jax.make_array_from_process_local_data(sharding.batch_sharding(self._mesh, v.ndim), v)
            for k, v in local.items()
        }
