"""Language-model rows from a 1-D token stream, through grain.

The stream is cut into fixed-length windows (a grain random-access source), shuffled with a seed
(reshuffled each epoch) and repeated: row `i` is a pure function of `i`, so `loader.DeviceBatches`
can hand every process exactly the rows its devices hold, and a resumed run sees the same data.

A token file is checked once for ids outside `[0, vocab_size)` (−1 would wrap to the last embedding
row and train as a label). The check reads the whole file, so its result (the ids' range, keyed by
the file's size and modification time) is kept beside it in `FILE.stats.json`; later starts, on every
host, read that instead of rescanning gigabytes. Without write access the scan simply runs each time.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import grain
import numpy as np
from ml_collections import ConfigDict

from bidirlm_jax.data.synthetic import markov_tokens
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.atomic import write_atomically
from bidirlm_jax.paths import user_path

log = logging.getLogger(__name__)

_SCAN_CHUNK = 1 << 24  # tokens per read while scanning a file for its id range


class TokenWindows:
    """Random-access source: window i is `tokens[i*T:(i+1)*T]` as `{"input_ids": int32[T]}`."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        start = index * self.seq_len
        return {"input_ids": np.asarray(self.tokens[start : start + self.seq_len], np.int32)}


def scan_id_range(tokens: np.ndarray) -> tuple[int, int]:
    """(smallest, largest) id of a non-empty array, read in chunks (a memory map never loads whole)."""
    low, high = None, None
    for start in range(0, len(tokens), _SCAN_CHUNK):
        chunk = np.asarray(tokens[start : start + _SCAN_CHUNK])
        low = int(chunk.min()) if low is None else min(low, int(chunk.min()))
        high = int(chunk.max()) if high is None else max(high, int(chunk.max()))
    return low, high


def _stats_path(path: Path) -> Path:
    return path.with_name(path.name + ".stats.json")


def id_range(path: Path, tokens: np.ndarray) -> tuple[int, int]:
    """The ids' (min, max): from the sidecar when it describes this very file, else scanned and recorded."""
    stat = path.stat()
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "dtype": str(tokens.dtype)}
    stats_path = _stats_path(path)
    try:
        saved = json.loads(stats_path.read_text())
        if {k: saved.get(k) for k in key} == key:
            return int(saved["min"]), int(saved["max"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no sidecar, or one we cannot use: scan
    low, high = scan_id_range(tokens)
    try:
        write_atomically(stats_path, json.dumps({**key, "min": low, "max": high}))
    except OSError as e:
        log.info("cannot record the id range of %s in %s (%s); it will be rescanned next time", path, stats_path, e)
    return low, high


def load_tokens(data: ConfigDict, vocab_size: int) -> np.ndarray:
    """The token stream the `data` config names: generated (`synthetic`) or a memory-mapped `.npy`."""
    if data.source == "synthetic":
        return markov_tokens(vocab_size, data.synthetic_tokens, seed=data.seed)
    path = user_path(data.path)
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
    if len(tokens):
        low, high = id_range(path, tokens)
        if low < 0:
            raise ConfigError(f"data.path {path} has negative token id {low}; token ids must lie in [0, vocab_size)")
        if high >= vocab_size:
            raise ConfigError(f"data.path {path} has token id {high} >= the model's vocab_size {vocab_size}")
    return tokens


def lm_rows(tokens: np.ndarray, *, seq_len: int, global_batch: int, seed: int) -> grain.MapDataset:
    """Endless shuffled rows `{"input_ids": int32[seq_len]}`; row `i` is the same on every process."""
    source = TokenWindows(tokens, seq_len)
    if len(source) < global_batch:
        raise ConfigError(
            f"the corpus has {len(source)} windows of {seq_len} tokens, fewer than one batch of {global_batch}; "
            "use more data, a shorter data.seq_len or a smaller data.global_batch_size"
        )
    return grain.MapDataset.source(source).shuffle(seed=seed).repeat()
