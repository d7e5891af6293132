"""Safetensors checkpoints as transformers lays them out: one file, or shards plus an index.

`ShardReader` has safetensors validate every header, then reads one tensor (or piece) at a time with
plain file reads, so a converter or a merge never holds more than the tensors it is working on.
`ShardWriter` streams tensors into shards whose headers are planned up front from the tensors'
shapes, so writing needs no more memory than the tensor being written — `safetensors.numpy.save_file`
would need a whole shard.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from bidirlm_jax.errors import CheckpointError, ConfigError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default `max_shard_size="5GB"`

_DTYPE_CODES = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3",
    np.dtype(ml_dtypes.float8_e5m2): "F8_E5M2",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
_TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def parse_size(text: str | int) -> int:
    """Bytes in "5GB", "500MB", "2GiB" or a plain integer (transformers' `max_shard_size` spelling)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"size {text!r} is not understood; write e.g. 5GB, 500MB or a number of bytes")
    unit = (m.group(2) or "B").upper()
    scale = {
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }
    size = int(float(m.group(1)) * scale[unit])
    if size <= 0:
        raise ConfigError(f"size {text!r} must be positive")
    return size


def dtype_from_code(code: str) -> np.dtype:
    """numpy dtype for a safetensors dtype code ("F32", "BF16", ...)."""
    if code not in _CODE_DTYPES:
        raise CheckpointError(f"unsupported tensor dtype {code}; supported: {sorted(_CODE_DTYPES)}")
    return _CODE_DTYPES[code]


def torch_dtype_name(dtype: np.dtype) -> str:
    """The name transformers writes as `dtype` in config.json for a floating numpy dtype."""
    return _TORCH_NAMES[_DTYPE_CODES[np.dtype(dtype)]]


def has_safetensors(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / INDEX_FILE).is_file() or (path / SINGLE_FILE).is_file() or any(path.glob("*.safetensors"))


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: np.dtype
    file: Path
    offset: int = 0  # byte offset of the tensor's data in `file`


def _data_offsets(file: Path) -> dict[str, int]:
    """Absolute byte offset of every tensor's data, from the safetensors header (8-byte length + JSON)."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {name: 8 + n + entry["data_offsets"][0] for name, entry in header.items() if name != "__metadata__"}


class ShardReader:
    """Lazy, read-only view of every tensor in a safetensors checkpoint directory (or one file)."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.path = path
        files = self._files(path)
        self._info: dict[str, TensorInfo] = {}
        for file in files:
            try:
                handle = safe_open(str(file), framework="numpy")
                offsets = _data_offsets(file)
                for name in handle.keys():
                    view = handle.get_slice(name)
                    self._info[name] = TensorInfo(
                        tuple(view.get_shape()), dtype_from_code(view.get_dtype()), file, offsets[name]
                    )
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(
                    f"{file} is not a readable safetensors file ({e}); it may be truncated or corrupt — "
                    "download or write it again"
                ) from e

    @staticmethod
    def _files(path: Path) -> list[Path]:
        if path.is_file():
            return [path]
        if not path.is_dir():
            raise CheckpointError(f"{path} does not exist")
        index = path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from e
            files = sorted({path / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} names shards that are missing: {missing}")
            return files
        if (path / SINGLE_FILE).is_file():
            return [path / SINGLE_FILE]
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(
                f"no safetensors weights in {path} (expected {SINGLE_FILE} or {INDEX_FILE}); "
                "for a pickled pytorch_model.bin pass --allow-pickle"
            )
        return files

    def keys(self) -> list[str]:
        return list(self._info)

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def info(self, name: str) -> TensorInfo:
        return self._info[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name].shape

    def dtype(self, name: str) -> np.dtype:
        return self._info[name].dtype

    def get(self, name: str) -> np.ndarray:
        """One whole tensor, in its stored dtype and shape."""
        return self.read_flat(name).reshape(self._info[name].shape)

    def read_flat(
        self, name: str, start: int = 0, stop: int | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Elements [start, stop) of the flattened tensor, read with plain file reads into `out` (or a new array).

        safetensors' own reader goes through a memory map, whose pages count toward the process's
        resident memory once touched, so one pass over a checkpoint through it grows RSS to the size
        of the checkpoint; this reads only the bytes asked for and keeps nothing mapped.
        """
        info = self._info[name]
        stop = math.prod(info.shape) if stop is None else stop
        if out is None:
            out = np.empty(stop - start, info.dtype)
        if out.dtype != info.dtype or out.size != stop - start or not out.flags.c_contiguous:
            raise ValueError(
                f"read_flat({name}): `out` must be a contiguous {info.dtype} array of {stop - start} elements"
            )
        buf = memoryview(out.reshape(-1).view(np.uint8))
        pos = info.offset + start * info.dtype.itemsize
        try:
            fd = os.open(info.file, os.O_RDONLY)
            try:
                while buf:
                    n = os.preadv(fd, [buf], pos)
                    if n == 0:
                        raise OSError(f"unexpected end of file at byte {pos}")
                    buf, pos = buf[n:], pos + n
            finally:
                os.close(fd)
        except OSError as e:
            raise CheckpointError(f"cannot read tensor {name} from {info.file}: {e}") from e
        return out

    def nbytes(self) -> int:
        return sum(math.prod(i.shape) * i.dtype.itemsize for i in self._info.values())


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


class ShardWriter:
    """Streams tensors, in the order of `specs`, into transformers-style shards inside `out_dir`.

    Shards are cut greedily at `max_shard_bytes` (a tensor bigger than the limit gets its own shard),
    named `model-0000i-of-0000n.safetensors` with a `model.safetensors.index.json`, or a single
    `model.safetensors` when everything fits in one. Every file carries `{"format": "pt"}` metadata,
    which transformers' loader expects.
    """

    def __init__(self, out_dir: Path, specs: Iterable[TensorSpec], *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.out_dir = Path(out_dir)
        self.specs = list(specs)
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise CheckpointError("duplicate tensor names in an output checkpoint")
        self._shards: list[list[TensorSpec]] = []
        size = 0
        for spec in self.specs:
            if not self._shards or (size + spec.nbytes > max_shard_bytes and self._shards[-1]):
                self._shards.append([])
                size = 0
            self._shards[-1].append(spec)
            size += spec.nbytes
        n = len(self._shards)
        self.file_names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._order = iter(self._stream())

    def _stream(self) -> Iterator[TensorSpec]:
        for file_name, shard in zip(self.file_names, self._shards):
            header: dict = {"__metadata__": {"format": "pt"}}
            offset = 0
            for spec in shard:
                header[spec.name] = {
                    "dtype": _DTYPE_CODES[np.dtype(spec.dtype)],
                    "shape": list(spec.shape),
                    "data_offsets": [offset, offset + spec.nbytes],
                }
                offset += spec.nbytes
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)  # safetensors aligns the data section to 8 bytes
            with open(self.out_dir / file_name, "wb") as f:
                f.write(struct.pack("<Q", len(blob)))
                f.write(blob)
                for spec in shard:
                    self._file = f
                    yield spec

    def write(self, name: str, array: np.ndarray) -> None:
        """Append the next tensor; names, shapes and dtypes must follow `specs` exactly."""
        array = np.asarray(array)
        self.write_stream(name, [array], shape=tuple(array.shape))

    def write_stream(self, name: str, pieces: Iterable[np.ndarray], *, shape: tuple[int, ...] | None = None) -> None:
        """Append the next tensor from consecutive pieces of its flattened (C-order) data.

        A tensor then never has to be whole in memory; the pieces must add up to the planned size.
        """
        spec = next(self._order, None)
        if spec is None or spec.name != name or (shape is not None and shape != spec.shape):
            raise CheckpointError(
                f"tensor {name} {shape or ''} does not match the planned output "
                f"({spec.name if spec else 'no more tensors'} {spec.shape if spec else ''})"
            )
        written = 0
        for piece in pieces:
            piece = np.ascontiguousarray(piece)
            if piece.dtype != np.dtype(spec.dtype):
                raise CheckpointError(
                    f"tensor {name} is {piece.dtype} but the planned output is {np.dtype(spec.dtype)}"
                )
            self._file.write(memoryview(piece.reshape(-1).view(np.uint8)))  # no `tobytes()` copy
            written += piece.nbytes
        if written != spec.nbytes:
            raise CheckpointError(f"tensor {name}: wrote {written} bytes, planned {spec.nbytes}")

    def close(self) -> None:
        """Finish the last shard and write the index (for more than one shard)."""
        leftover = next(self._order, None)
        if leftover is not None:
            raise CheckpointError(f"output checkpoint incomplete: {leftover.name} was never written")
        if len(self.file_names) > 1:
            weight_map = {s.name: f for f, shard in zip(self.file_names, self._shards) for s in shard}
            index = {"metadata": {"total_size": sum(s.nbytes for s in self.specs)}, "weight_map": weight_map}
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
