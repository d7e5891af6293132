"""Opening a checkpoint's tensors: safetensors shards, pickled `pytorch_model.bin` (on request), and the
project's own orbax checkpoints and training runs, named as transformers names them.

Every reader answers `keys()`, `shape`/`dtype`/`get` (loading) and `info`/`read_flat` (the streamed merge),
so a merge reads a training run as it reads an HF directory, without exporting it first.
"""

from __future__ import annotations

import abc
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from bidirlm_jax.errors import CheckpointError
from bidirlm_jax.io.checkpoint import load_checkpoint
from bidirlm_jax.io.model_types import model_type_of
from bidirlm_jax.io.shards import ShardReader, TensorInfo, has_safetensors
from bidirlm_jax.io.sources import Source, source_of
from bidirlm_jax.io.weights.save import param_arrays
from bidirlm_jax.paths import user_path


class _ArrayReader(abc.ABC):
    """A reader over arrays it can hand out whole (`_array`), with `ShardReader`'s interface on top."""

    _path: Path
    _position: dict[str, int]

    @abc.abstractmethod
    def _array(self, name: str) -> np.ndarray:
        """The tensor `name`, whole (each reader's own source: a pickle's tensors, a restored orbax tree)."""

    def keys(self) -> list[str]:
        return list(self._position)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._array(name).shape)

    def dtype(self, name: str) -> np.dtype:
        return self._array(name).dtype

    def get(self, name: str) -> np.ndarray:
        return self._array(name)

    def info(self, name: str) -> TensorInfo:
        """The tensor's record; its `offset` is the tensor's position in the checkpoint (only the order is used)."""
        array = self._array(name)
        return TensorInfo(tuple(array.shape), array.dtype, self._path, self._position[name])

    def read_flat(
        self, name: str, start: int = 0, stop: int | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        piece = self._array(name).reshape(-1)[start:stop]
        if out is None:
            return piece.copy()
        out[...] = piece
        return out


class _PickleReader(_ArrayReader):
    """`pytorch_model.bin` (single or sharded), read with `torch.load(weights_only=True)`; also behind
    `ShardReader`'s `info`/`read_flat`, which the streamed merge reads through (torch memory-maps the file)."""

    def __init__(self, path: Path):
        try:
            import torch  # optional dependency, only for pickled checkpoints
        except ImportError as e:
            raise CheckpointError(
                f"{path} holds pickled PyTorch weights: install torch (pip install torch) to read pytorch_model.bin, "
                "or convert them to safetensors first"
            ) from e

        index = path / "pytorch_model.bin.index.json"
        files = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.is_file()
            else ["pytorch_model.bin"]
        )
        self._path = path
        self._tensors: dict[str, Any] = {}
        for name in files:
            try:
                self._tensors.update(torch.load(path / name, map_location="cpu", weights_only=True, mmap=True))
            except Exception as e:  # torch raises many types for a bad pickle
                raise CheckpointError(f"cannot read {path / name} as a PyTorch checkpoint: {e}") from e
        self._position = {key: i for i, key in enumerate(self._tensors)}

    def _array(self, name: str) -> np.ndarray:
        """A view of the memory map: nothing is read until it is used."""
        import ml_dtypes
        import torch

        t = self._tensors[name]
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


class OrbaxReader(_ArrayReader):
    """A bidirlm checkpoint (`bidirlm convert`) or training run (its latest step) as transformers-named
    tensors in its model type's export layout (a causal LM's, Qwen3-VL's), in the dtype the parameters
    are kept in (a run's fp32 master weights).

    The parameters are restored once, onto the host, one tensor per layer whatever layout the run trained
    with: memory holds the model once (orbax has no per-tensor reads of a stacked layer)."""

    def __init__(self, path: Path):
        model = load_checkpoint(path)
        kind, arrays = model_type_of(model), param_arrays(model)
        self._path = path
        self._tensors = {
            kind.export_layout.key(table.component, e.hf_key): e.to_hf(np.asarray(arrays[e.path]))
            for table in kind.tables(model.config)
            for e in table.entries
        }
        self._position = {key: i for i, key in enumerate(self._tensors)}

    def _array(self, name: str) -> np.ndarray:
        return self._tensors[name]


def open_weights(path: str | os.PathLike, *, allow_pickle: bool = False) -> ShardReader | _ArrayReader:
    """The reader for what `path` holds: safetensors, pickled weights (only with `allow_pickle`), or ours."""
    path = user_path(path)
    if has_safetensors(path):
        return ShardReader(path)
    if (path / "pytorch_model.bin").is_file() or (path / "pytorch_model.bin.index.json").is_file():
        if not allow_pickle:
            raise CheckpointError(
                f"{path} only has pickled PyTorch weights (pytorch_model.bin), which can run code when loaded; "
                "pass --allow-pickle (allow_pickle=True) to read them with torch.load(weights_only=True), "
                "or convert them to safetensors first"
            )
        return _PickleReader(path)
    source = source_of(path)
    if source is Source.FINETUNE_RUN:
        raise CheckpointError(
            f"{path} is a fine-tuning run (an encoder with a task head), whose tensors are not a causal LM's: "
            f"export it with `bidirlm export {path} DIR` and use that directory"
        )
    if source in (Source.CHECKPOINT, Source.RUN):
        return OrbaxReader(path)
    raise CheckpointError(
        f"no weights in {path}: expected model.safetensors, a sharded safetensors index or pytorch_model.bin"
    )
