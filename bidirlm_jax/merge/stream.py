"""The streaming engine: a planned merge read, merged and written piece by piece, never a whole checkpoint.

Fixed-size pieces of every tensor are read with plain file reads on a thread pool, merged on the host
CPU (`bidirlm_jax.merge.linear`, or mergekit's arithmetic replayed) and appended to transformers-style
shards, so memory holds a few pieces. The output appears at its destination only once complete.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import math
import queue
import threading
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from bidirlm_jax.io.atomic import atomic_directory, check_destination
from bidirlm_jax.io.shards import DEFAULT_MAX_SHARD_BYTES, ShardWriter, TensorSpec
from bidirlm_jax.merge.compose import plan_compose
from bidirlm_jax.merge.linear import coefficients, combine
from bidirlm_jax.merge.mergekit_linear import mergekit_linear
from bidirlm_jax.merge.plan import MERGEABLE, Entry, Input, Plan, plan_merge
from bidirlm_jax.merge.spec import RECORD_FILE, MergeSpec

CHUNK_ELEMENTS = 1 << 22  # elements per streamed piece: 8 MB of bf16 per input, 16 MB of f32 accumulator
_MIN_BUCKET = 1 << 12  # pieces are padded to powers of two, so a handful of shapes are ever compiled
_PREFETCH = 4  # pieces read ahead while the current one is merged and written

# The merge of one piece: the inputs' elements (padded) -> the output's, in the given dtype.
_Kernel = Callable[[list[np.ndarray], np.dtype], np.ndarray]


@dataclass(frozen=True)
class MergeResult:
    """What a streamed merge did with every tensor, by checkpoint key."""

    out: Path
    merged: tuple[str, ...]  # output keys computed from every model
    carried: tuple[str, ...]  # output keys copied bit for bit from one model (the base, or a composition's tower)
    dropped: tuple[tuple[str, str], ...]  # (model path, key) excluded from a model other than the base, or left
    # out by a composition (LM heads, towers it does not take)


@dataclass(frozen=True)
class _Piece:
    """A run of output elements processed at once: slices of consecutive tensors (merged ones share dtypes)."""

    segments: tuple[tuple[Entry, int, int], ...]  # (tensor, first element, end element), in output order
    merged: bool

    @property
    def size(self) -> int:
        return sum(stop - start for _, start, stop in self.segments)


def _split(entries: list[Entry], inputs: list[Input], chunk: int) -> list[_Piece]:
    """Cut the output into pieces of `chunk` elements; merged tensors are packed together, so small ones
    (norms) do not cost a kernel call each and nearly every piece has the one compiled shape."""
    pieces: list[_Piece] = []
    run: list[tuple[Entry, int, int]] = []
    filled = 0
    signature = None
    for entry in entries:
        sig = entry.merged and (tuple(inputs[i].reader.info(k).dtype for i, k in entry.sources), entry.dtype)
        if run and sig != signature:  # a carried tensor or other dtypes: the run ends here
            pieces.append(_Piece(tuple(run), True))
            run, filled = [], 0
        if not entry.merged:
            pieces += [_Piece(((entry, s, min(s + chunk, entry.size)),), False) for s in range(0, entry.size, chunk)]
            continue
        signature = sig
        start = 0
        while start < entry.size:
            take = min(chunk - filled, entry.size - start)
            run.append((entry, start, start + take))
            filled, start = filled + take, start + take
            if filled == chunk:
                pieces.append(_Piece(tuple(run), True))
                run, filled = [], 0
    if run:
        pieces.append(_Piece(tuple(run), True))
    return pieces


def _aligned_empty(n: int, dtype: np.dtype) -> np.ndarray:
    """An uninitialised array on a 64-byte boundary, which jax's CPU client uses in place instead of copying."""
    raw = np.empty(n * dtype.itemsize + 64, np.uint8)
    offset = -raw.ctypes.data % 64
    return raw[offset : offset + n * dtype.itemsize].view(dtype)


def _kernel(spec: MergeSpec) -> _Kernel:
    """Our float32 kernel on XLA's CPU threads, or mergekit's arithmetic replayed in numpy."""
    weights = [m.weight for m in spec.models]
    coeffs = coefficients(weights, spec.normalize, len(weights))  # also refuses weights that cannot be used
    if spec.arithmetic == "mergekit":

        def replay(arrays: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
            compute = MERGEABLE[spec.dtype] if spec.dtype else reduce(jnp.promote_types, [a.dtype for a in arrays])
            return mergekit_linear(arrays, weights, normalize=spec.normalize, compute_dtype=compute).astype(dtype)

        return replay
    cpu = jax.devices("cpu")[0]  # the data comes from and goes back to host memory: no accelerator round trip

    def ours(arrays: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
        with jax.default_device(cpu):
            return np.asarray(combine(coeffs, tuple(arrays), dtype))

    return ours


def _pieces(
    pieces: list[_Piece], inputs: list[Input], kernel: _Kernel, chunk: int
) -> Generator[np.ndarray, None, None]:
    """Every segment's output elements, in order: reads run ahead on a thread pool while `kernel` merges.

    Each piece gets fresh buffers, since jax computes on them in place.
    """

    def load(piece: _Piece) -> list[np.ndarray]:
        if not piece.merged:
            ((entry, start, stop),) = piece.segments
            return [inputs[entry.sources[0][0]].reader.read_flat(entry.sources[0][1], start, stop)]
        n = piece.size
        bucket = min(chunk, max(_MIN_BUCKET, 1 << (n - 1).bit_length()))  # padded: few compiled shapes
        arrays = []
        for i in range(len(inputs)):
            buf = _aligned_empty(bucket, inputs[i].reader.info(piece.segments[0][0].sources[i][1]).dtype)
            offset = 0
            for entry, start, stop in piece.segments:
                inputs[i].reader.read_flat(entry.sources[i][1], start, stop, out=buf[offset : offset + stop - start])
                offset += stop - start
            buf[n:] = 0
            arrays.append(buf)
        return arrays

    todo = iter(pieces)
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = collections.deque((piece, pool.submit(load, piece)) for piece in itertools.islice(todo, _PREFETCH))
        while pending:
            piece, future = pending.popleft()
            pending.extend((p, pool.submit(load, p)) for p in itertools.islice(todo, 1))
            arrays = future.result()
            result = kernel(arrays, piece.segments[0][0].dtype) if piece.merged else arrays[0]
            if any(entry.rows for entry, _, _ in piece.segments):
                result = _copy_rows(np.array(result), piece, inputs)
            offset = 0
            for _, start, stop in piece.segments:
                yield result[offset : offset + stop - start]
                offset += stop - start


def _copy_rows(result: np.ndarray, piece: _Piece, inputs: list[Input]) -> np.ndarray:
    """`result` (a merged piece's output elements) with the rows its tensors take from one model instead."""
    offset = 0
    for entry, start, stop in piece.segments:
        width = math.prod(entry.shape[1:])
        for row, model in entry.rows:
            first, last = max(start, row * width), min(stop, (row + 1) * width)
            if first < last:
                key = entry.sources[model][1]
                values = inputs[model].reader.read_flat(key, first, last)
                result[offset + first - start : offset + last - start] = values.astype(result.dtype)
        offset += stop - start
    return result


def _ahead(items: Generator[Any, None, None], depth: int) -> Iterator[Any]:
    """`items` produced on a background thread, up to `depth` ahead, so producing overlaps consuming."""
    slots: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slots.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            slots.put((end, None))
        except BaseException as e:  # handed to the consumer, which re-raises it
            slots.put((end, e))
        finally:
            items.close()

    thread = threading.Thread(target=produce, name="merge-producer", daemon=True)
    thread.start()
    try:
        while True:
            item, error = slots.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            with contextlib.suppress(queue.Empty):
                slots.get(timeout=0.1)


def merge_checkpoints(
    spec: MergeSpec,
    out: str | Path,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
    chunk_elements: int = CHUNK_ELEMENTS,
    allow_pickle: bool = False,
) -> MergeResult:
    """Merge the checkpoint directories of `spec` into `out`, streaming tensor by tensor.

    Everything is checked before anything is written (architectures, vocabularies, shapes, weights,
    the destination); the output — safetensors shards with an index, the base's config.json, tokenizer
    and other files (subdirectories included, weights excepted), and the recipe as `mergekit_config.yml`
    — appears at `out` only once complete. `allow_pickle` reads `pytorch_model.bin` inputs (pickle: only
    from sources you trust).
    """
    out = check_destination(out, overwrite=overwrite)
    kernel = _kernel(spec)
    planner = plan_merge if spec.compose is None else plan_compose
    plan = planner(spec, out, allow_pickle=allow_pickle)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        _write(plan, tmp, kernel, max_shard_bytes=max_shard_bytes, progress=progress, chunk=chunk_elements)
    base = spec.base_index
    return MergeResult(
        out=out,
        merged=tuple(e.key for e in plan.entries if e.merged),
        carried=tuple(e.key for e in plan.entries if not e.merged),
        dropped=tuple((inp.model.path, k) for i, inp in enumerate(plan.inputs) if i != base for k in inp.excluded)
        + plan.dropped,
    )


def _write(plan: Plan, tmp: Path, kernel: _Kernel, *, max_shard_bytes: int, progress: bool, chunk: int) -> None:
    """The planned output, into the (temporary) directory `tmp`."""
    entries = plan.entries
    writer = ShardWriter(tmp, [TensorSpec(e.key, e.shape, e.dtype) for e in entries], max_shard_bytes=max_shard_bytes)
    pieces = _split(entries, plan.inputs, chunk)
    segments = collections.Counter(entry.key for piece in pieces for entry, _, _ in piece.segments)
    stream = _ahead(_pieces(pieces, plan.inputs, kernel, chunk), depth=_PREFETCH)  # written while merged
    with contextlib.closing(stream), tqdm(total=len(entries), unit="tensor", desc="merge", disable=not progress) as bar:
        for entry in entries:
            writer.write_stream(entry.key, itertools.islice(stream, segments[entry.key]))
            bar.update()
    writer.close()
    plan.files.copy_into(tmp)
    for name, document in plan.documents.items():
        (tmp / name).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    if plan.config is not None:
        (tmp / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
    (tmp / RECORD_FILE).write_text(plan.spec.to_yaml(plan.out_dtype))
