"""Linear weight merging: θ = Σ wᵢθᵢ / Σ wᵢ per tensor, in memory (JAX pytrees) or streamed on disk.

The paper fights forgetting by interpolating an adapted encoder with its base, and composes encoders
with specialists (safety, vision, audio) that share the text backbone (paper-recipe §4–§5). Both
forms share one kernel, `_combine`, so they agree bit for bit:

    θ = s·θ₀ + Σ_{i≥1} cᵢ (θᵢ − θ₀)      cᵢ = wᵢ/Σw, s = 1   (normalised; s = Σw, cᵢ = wᵢ otherwise)

which is Σ wᵢθᵢ/Σw rearranged so that models that agree give back exactly that value, whatever the
weights (a model merged with itself is returned bit for bit), accumulated in float32 (or wider) and
cast once to the output dtype.

The streaming form (`merge_checkpoints`) reads fixed-size pieces of every tensor with plain file reads,
merges them on the host CPU and appends them to transformers-style shards, so memory holds a few
pieces, never a checkpoint. Every tensor of every input is accounted for: merged (all models have it),
carried through bit for bit (only the base has it, or it is excluded), dropped (excluded, not the
base's) — anything else is an error that names the tensors.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import itertools
import json
import math
import queue
import re
import shutil
import threading
import warnings
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from bidirlm_jax.errors import CheckpointError, ConfigError
from bidirlm_jax.io.atomic import atomic_directory, check_destination
from bidirlm_jax.io.hf_config import set_attention_mode
from bidirlm_jax.io.layouts import LM_HEAD, detect_layout
from bidirlm_jax.io.shards import DEFAULT_MAX_SHARD_BYTES, ShardReader, ShardWriter, TensorSpec
from bidirlm_jax.merge_config import MergeModel, MergeSpec, load_merge_yaml, spec_from_args

__all__ = [
    "MergeModel",
    "MergeResult",
    "MergeSpec",
    "interpolate",
    "linear_merge",
    "load_merge_yaml",
    "merge_checkpoints",
    "spec_from_args",
]

PyTree = Any
_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
RECORD_FILE = "mergekit_config.yml"
CHUNK_ELEMENTS = 1 << 22  # elements per streamed piece: 8 MB of bf16 per input, 16 MB of f32 accumulator
_MIN_BUCKET = 1 << 12  # pieces are padded to powers of two, so a handful of shapes are ever compiled
_PREFETCH = 4  # pieces read ahead while the current one is merged and written

# Files of a checkpoint directory that hold weights (never copied from the base) or describe the base itself.
_NOT_COPIED = re.compile(
    r".*\.(safetensors|bin|pt|pth|ckpt|msgpack|h5|gguf)|.*\.(safetensors|bin)\.index\.json|config\.json|README\.md|"
    + re.escape(RECORD_FILE)
)
# config.json fields that define the text backbone's tensors; they must agree between merged models.
_ARCH_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)


# ----------------------------------------------------------------------------------------------------
# The kernel and the in-memory form
# ----------------------------------------------------------------------------------------------------


def _coefficients(weights: Any, normalize: bool, n: int) -> jax.Array | np.ndarray:
    """[s, c₁, …, cₙ₋₁] of the module docstring's formula, float32; traced weights stay traced (under jit)."""
    try:
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        w = jnp.stack([jnp.asarray(x, jnp.float32) for x in weights])
        if normalize:
            return jnp.concatenate([jnp.ones(1, jnp.float32), w[1:] / jnp.sum(w)])
        return jnp.concatenate([jnp.sum(w, keepdims=True), w[1:]])
    if w.size != n:
        raise ConfigError(f"{w.size} weights for {n} models; give one weight per model")
    if not np.all(np.isfinite(w)):
        raise ConfigError(f"weights must be finite numbers, got {w.tolist()}")
    if normalize:
        total = w.sum()
        if abs(total) < 1e-12:
            raise ConfigError(
                f"the weights {w.tolist()} sum to zero, and normalisation divides by their sum; "
                "change the weights or turn normalisation off (--no-normalize / parameters.normalize: false)"
            )
        return np.concatenate([[1.0], w[1:] / total]).astype(np.float32)
    return np.concatenate([[w.sum()], w[1:]]).astype(np.float32)


@partial(jax.jit, static_argnames="out_dtype")
def _combine(coeffs: jax.Array, xs: tuple[jax.Array, ...], out_dtype: np.dtype) -> jax.Array:
    """s·x₀ + Σ cᵢ(xᵢ − x₀), accumulated in float32 (float64 inputs under x64 stay float64)."""
    acc_dtype = jnp.promote_types(jnp.float32, jnp.result_type(*xs))
    x0 = xs[0].astype(acc_dtype)
    acc = coeffs[0].astype(acc_dtype) * x0
    for i, x in enumerate(xs[1:], start=1):
        acc = acc + coeffs[i].astype(acc_dtype) * (x.astype(acc_dtype) - x0)
    return acc.astype(out_dtype)


def _listing(items: Sequence[str], limit: int = 12) -> str:
    shown = "\n  ".join(items[:limit])
    more = f"\n  … and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {shown}{more}"


def linear_merge(
    trees: Sequence[PyTree], weights: Sequence[float] | jax.Array, *, normalize: bool = True, dtype: Any = None
) -> PyTree:
    """Σ wᵢ·treeᵢ / Σ wᵢ leaf by leaf (Σ wᵢ·treeᵢ without `normalize`), accumulated in float32.

    Any pytrees of one structure (dicts of arrays, `nnx.State`, …), sharded or not; jit-able, with
    weights that may be traced. Each output leaf takes `dtype`, or the first tree's leaf dtype, and
    keeps its inputs' sharding. Non-floating leaves and mismatched structures or shapes raise
    `ConfigError` naming them.
    """
    if not trees:
        raise ConfigError("linear_merge needs at least one pytree")
    flat0, treedef = jax.tree_util.tree_flatten_with_path(trees[0])
    paths = [jax.tree_util.keystr(p) for p, _ in flat0]
    leaves = [[x for _, x in flat0]]
    for i, tree in enumerate(trees[1:], start=1):
        flat, other = jax.tree_util.tree_flatten_with_path(tree)
        if other != treedef:
            mine, theirs = set(paths), {jax.tree_util.keystr(p) for p, _ in flat}
            diff = sorted(mine ^ theirs) or [f"{treedef} vs {other}"]
            raise ConfigError(f"pytree {i} does not have the structure of pytree 0; differing leaves:{_listing(diff)}")
        leaves.append([x for _, x in flat])
    bad_shape = [
        f"{p}: {' vs '.join(str(tuple(jnp.shape(ls[j]))) for ls in leaves)}"
        for j, p in enumerate(paths)
        if len({tuple(jnp.shape(ls[j])) for ls in leaves}) > 1
    ]
    if bad_shape:
        raise ConfigError(f"leaves with different shapes in the merged pytrees:{_listing(bad_shape)}")
    not_float = [
        p for j, p in enumerate(paths) if not all(jnp.issubdtype(jnp.result_type(ls[j]), jnp.floating) for ls in leaves)
    ]
    if not_float:
        raise ConfigError(f"a linear merge averages floating-point leaves only; these are not:{_listing(not_float)}")
    coeffs = _coefficients(weights, normalize, len(trees))
    merged = [
        _combine(coeffs, tuple(ls[j] for ls in leaves), np.dtype(dtype or jnp.result_type(leaves[0][j])))
        for j in range(len(paths))
    ]
    return jax.tree_util.tree_unflatten(treedef, merged)


def interpolate(params_a: PyTree, params_b: PyTree, alpha: float | jax.Array, *, dtype: Any = None) -> PyTree:
    """(1 − α)·a + α·b leaf by leaf, computed as a + α(b − a): α = 0 gives `params_a` back bit for bit.

    The paper's "merging ratio r% with the base" is `interpolate(adapted, base, r / 100)`.
    """
    return linear_merge([params_a, params_b], [1 - alpha, alpha], dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# Planning a streamed merge: which tensor of which model goes where
# ----------------------------------------------------------------------------------------------------

# A tensor's identity across models: ("backbone", backbone-relative name) or ("other", checkpoint key).
_Name = tuple[str, str]


@dataclass
class _Input:
    model: MergeModel
    reader: ShardReader
    config: dict | None
    names: dict[_Name, str] = field(default_factory=dict)  # identity -> checkpoint key (not excluded)
    excluded: list[str] = field(default_factory=list)

    @property
    def text_config(self) -> dict:
        return (self.config or {}).get("text_config") or self.config or {}

    def describe(self) -> str:
        t = self.text_config
        kind = t.get("model_type") or (self.config or {}).get("model_type") or "unknown architecture"
        return (
            f"{self.model.path} ({kind}, {t.get('num_hidden_layers', '?')} layers, hidden {t.get('hidden_size', '?')})"
        )


@dataclass(frozen=True)
class _Entry:
    """One output tensor: the base's key, and the (model, key) pairs it is computed from."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    sources: tuple[tuple[int, str], ...]  # every model in order (merged) or just the base (carried)
    merged: bool

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class MergeResult:
    """What a streamed merge did with every tensor, by checkpoint key."""

    out: Path
    merged: tuple[str, ...]  # output keys computed from every model
    carried: tuple[str, ...]  # output keys copied bit for bit from the base
    dropped: tuple[tuple[str, str], ...]  # (model path, key) excluded from a model other than the base


def _open(model: MergeModel) -> _Input:
    path = Path(model.path)
    if not path.exists():
        raise CheckpointError(
            f"model path {model.path} does not exist; bidirlm merge reads local checkpoint directories "
            "(download hub models first, e.g. with `hf download`)"
        )
    reader = ShardReader(path)
    config = None
    config_file = (path if path.is_dir() else path.parent) / "config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_file} is not valid JSON: {e}") from None
    return _Input(model, reader, config)


def _key_mapper(inp: _Input) -> Callable[[str], str | None]:
    """checkpoint key -> backbone-relative name (None outside the backbone), from the key pattern or the layout."""
    if inp.model.key_pattern is not None:
        rx = re.compile(inp.model.key_pattern)

        def from_pattern(key: str) -> str | None:
            m = rx.fullmatch(key)
            return None if m is None else next((g for g in m.groups() if g is not None), None)

        return from_pattern
    try:
        return detect_layout(inp.reader.keys()).to_canonical
    except CheckpointError as e:
        raise CheckpointError(f"{inp.model.path}: {e} (--key-pattern PATH=REGEX)") from None


def _index(inp: _Input, exclude: Sequence[re.Pattern]) -> None:
    to_canonical = _key_mapper(inp)
    for key in inp.reader.keys():
        if any(rx.search(key) for rx in exclude):
            inp.excluded.append(key)
            continue
        canonical = to_canonical(key)
        name = ("other", key) if canonical is None else ("backbone", canonical)
        if name in inp.names:
            raise ConfigError(
                f"{inp.model.path}: keys {inp.names[name]} and {key} both map to backbone tensor {canonical}; "
                "fix the --key-pattern"
            )
        inp.names[name] = key


def _check_configs(inputs: list[_Input]) -> None:
    """Refuse text backbones whose config.json disagree on a field that shapes their tensors."""
    known = [inp for inp in inputs if inp.config is not None]
    diffs = []
    for f in _ARCH_FIELDS:
        values = {inp.model.path: inp.text_config.get(f) for inp in known if inp.text_config.get(f) is not None}
        if len(set(values.values())) > 1:
            diffs.append(f"{f}: " + ", ".join(f"{p}={v}" for p, v in values.items()))
    if diffs:
        raise ConfigError(
            "the models have different architectures (their text backbones cannot be merged tensor by tensor):"
            f"{_listing(diffs)}\nmodels: " + "; ".join(inp.describe() for inp in inputs)
        )


def _warn_gemma_norms(inputs: list[_Input], spec: MergeSpec) -> None:
    """Gemma's RMSNorm applies (1 + w): Σ wᵢθᵢ gives the norms the intended scale only when Σ wᵢ = 1."""
    total = sum(m.weight for m in spec.models)
    gemma = any(str(inp.text_config.get("model_type", "")).startswith("gemma") for inp in inputs)
    if gemma and not spec.normalize and abs(total - 1) > 1e-6:
        warnings.warn(
            f"unnormalised weights summing to {total:g} on a Gemma model: its norms store w and apply (1 + w), "
            f"so the merged norms' scale is off by {1 - total:+g} from the weighted sum of the inputs' scales",
            stacklevel=3,
        )


def _ties_embeddings(inp: _Input) -> bool:
    t, top = inp.text_config, inp.config or {}
    return bool(t.get("tie_word_embeddings", top.get("tie_word_embeddings", True)))  # transformers' default


def _plan(inputs: list[_Input], base: int, out_dtype: str | None) -> list[_Entry]:
    """Every output tensor, in the base's storage order, after checking that nothing would be lost."""
    b = inputs[base]
    head, embed = ("backbone", LM_HEAD), ("backbone", "embed_tokens.weight")
    sources_of: dict[_Name, list[str | None]] = {}
    for name in b.names:
        row = [inp.names.get(name) for inp in inputs]
        if name == head:  # a model that ties its embeddings contributes its embed_tokens as its head
            row = [
                k if k is not None or embed not in inp.names or not _ties_embeddings(inp) else inp.names[embed]
                for k, inp in zip(row, inputs)
            ]
        sources_of[name] = row

    architecture = []  # backbone tensors that not every model has
    lost = []  # tensors the output would drop or only half-merge
    for name, row in sources_of.items():
        lacking = [inputs[i].model.path for i, k in enumerate(row) if k is None]
        if lacking and name[0] == "backbone":
            architecture.append(f"{b.names[name]} (missing in {', '.join(lacking)})")
        elif lacking and len(lacking) < len(inputs) - 1:
            lost.append(f"{b.names[name]} (missing in {', '.join(lacking)})")
    for i, inp in enumerate(inputs):
        for name, key in inp.names.items():
            if i != base and name not in b.names:
                where = f"{key} (in {inp.model.path}, not in the base)"
                (architecture if name[0] == "backbone" and name != head else lost).append(where)
    if architecture:
        raise ConfigError(
            "the models have different architectures: their text backbones do not hold the same tensors"
            f"{_listing(architecture)}\nmodels: "
            + "; ".join(inp.describe() for inp in inputs)
            + "\nmerge checkpoints of one architecture, or --exclude REGEX the tensors to take from the base only"
        )
    if lost:
        raise ConfigError(
            f"tensors that would be lost or half-merged (the base, {b.model.path}, decides the output's tensors):"
            f"{_listing(lost)}\nmake the model that has them the base (--base / base_model), "
            "or --exclude REGEX them to keep only the base's copy"
        )

    for name in (embed, head):
        row = sources_of.get(name)
        if row and all(k is not None for k in row):
            rows = {inputs[i].model.path: inputs[i].reader.info(k).shape[0] for i, k in enumerate(row)}
            if len(set(rows.values())) > 1:
                raise ConfigError(
                    f"vocabulary sizes differ ({b.names[name]}: "
                    + ", ".join(f"{p} has {n} rows" for p, n in rows.items())
                    + "); merged models must share one tokenizer and vocabulary. Resize the embeddings to a "
                    "common vocabulary first (mergekit would silently keep only the common rows), or "
                    "--exclude 'embed_tokens|lm_head' to keep the base's"
                )
    bad_shapes = []
    for name, row in sources_of.items():
        if all(k is not None for k in row):
            shapes = [inputs[i].reader.info(k).shape for i, k in enumerate(row)]
            if len(set(shapes)) > 1:
                bad_shapes.append(f"{b.names[name]}: " + " vs ".join(str(s) for s in shapes))
    if bad_shapes:
        raise ConfigError(
            f"tensors whose shapes differ between the models:{_listing(bad_shapes)}\n"
            "--exclude REGEX them to keep only the base's copy"
        )

    target = None if out_dtype is None else _DTYPES[out_dtype]
    entries = []
    for name, row in sources_of.items():
        key = b.names[name]
        info = b.reader.info(key)
        merged = all(k is not None for k in row) and len(inputs) > 1
        if merged and not jnp.issubdtype(info.dtype, jnp.floating):  # numpy misses bfloat16
            _check_identical(inputs, row)
            merged = False
        if merged:
            dtypes = [inputs[i].reader.info(k).dtype for i, k in enumerate(row)]
            if any(d == np.float64 for d in dtypes + [target] if d is not None) and not jax.config.jax_enable_x64:
                raise ConfigError(f"{key} is float64; convert the checkpoints to float32 first (or enable jax x64)")
            entries.append(_Entry(key, info.shape, target or info.dtype, tuple(enumerate(row)), True))
        else:
            entries.append(_Entry(key, info.shape, info.dtype, ((base, key),), False))
    for key in b.excluded:
        info = b.reader.info(key)
        entries.append(_Entry(key, info.shape, info.dtype, ((base, key),), False))
    entries.sort(key=lambda e: (str(b.reader.info(e.key).file), b.reader.info(e.key).offset))
    return entries


def _check_identical(inputs: list[_Input], row: list[str]) -> None:
    """Integer/bool tensors cannot be averaged: carry them through if every model agrees, else refuse."""
    first = inputs[0].reader.read_flat(row[0])
    for i, k in enumerate(row[1:], start=1):
        other = inputs[i].reader.read_flat(k)
        if other.dtype != first.dtype or not np.array_equal(other, first):
            raise ConfigError(
                f"{row[0]} is a non-floating tensor ({first.dtype}) that differs between {inputs[0].model.path} "
                f"and {inputs[i].model.path}; it cannot be averaged — --exclude it to keep the base's"
            )


# ----------------------------------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Piece:
    """A run of output elements processed at once: slices of consecutive tensors (merged ones share dtypes)."""

    segments: tuple[tuple[_Entry, int, int], ...]  # (tensor, first element, end element), in output order
    merged: bool

    @property
    def size(self) -> int:
        return sum(stop - start for _, start, stop in self.segments)


def _split(entries: list[_Entry], inputs: list[_Input], chunk: int) -> list[_Piece]:
    """Cut the output into pieces of `chunk` elements; merged tensors are packed together, so small ones
    (norms) do not cost a kernel call each and nearly every piece has the one compiled shape."""
    pieces: list[_Piece] = []
    run: list[tuple[_Entry, int, int]] = []
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


def _pieces(
    pieces: list[_Piece], inputs: list[_Input], coeffs: np.ndarray, chunk: int
) -> Generator[np.ndarray, None, None]:
    """Every segment's output elements, in order: reads run ahead on a thread pool, merges on XLA's CPU threads.

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

    cpu = jax.devices("cpu")[0]  # the data comes from and goes back to host memory: no accelerator round trip
    todo = iter(pieces)
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = collections.deque((piece, pool.submit(load, piece)) for piece in itertools.islice(todo, _PREFETCH))
        while pending:
            piece, future = pending.popleft()
            pending.extend((p, pool.submit(load, p)) for p in itertools.islice(todo, 1))
            arrays = future.result()
            if piece.merged:
                with jax.default_device(cpu):
                    result = np.asarray(_combine(coeffs, tuple(arrays), piece.segments[0][0].dtype))
            else:
                result = arrays[0]
            offset = 0
            for _, start, stop in piece.segments:
                yield result[offset : offset + stop - start]
                offset += stop - start


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


def _output_config(config: dict, spec: MergeSpec, out_dtype: str | None) -> dict:
    """The base's config.json with the merge's attention mode and dtype."""
    config = copy.deepcopy(config)
    if spec.attention is not None:
        config = set_attention_mode(config, spec.attention, spec.bidirectional_window)
    if out_dtype is not None:
        config["dtype"] = out_dtype  # transformers 5's key; older ones wrote torch_dtype
        for d in (config, config.get("text_config") or {}):
            for key in ("dtype", "torch_dtype"):
                if key in d:
                    d[key] = out_dtype
    return config


def merge_checkpoints(
    spec: MergeSpec,
    out: str | Path,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> MergeResult:
    """Merge the checkpoint directories of `spec` into `out`, streaming tensor by tensor.

    Everything is checked before anything is written (architectures, vocabularies, shapes, weights,
    the destination); the output — safetensors shards with an index, the base's config.json and
    tokenizer files, and the recipe as `mergekit_config.yml` — appears at `out` only once complete.
    """
    out = check_destination(out, overwrite=overwrite)
    coeffs = _coefficients([m.weight for m in spec.models], spec.normalize, len(spec.models))
    exclude = [re.compile(p) for p in spec.exclude]
    inputs = [_open(m) for m in spec.models]
    base = spec.base_index
    b = inputs[base]
    if spec.attention is not None and b.config is None:
        raise ConfigError(f"cannot set the attention mode: the base {b.model.path} has no config.json")
    for inp in inputs:
        _index(inp, exclude)
    _check_configs(inputs)
    _warn_gemma_norms(inputs, spec)
    entries = _plan(inputs, base, spec.out_dtype)
    merged_dtypes = {_DTYPE_NAMES.get(e.dtype) for e in entries if e.merged}
    out_dtype = spec.out_dtype or (merged_dtypes.pop() if len(merged_dtypes) == 1 else None)
    config = None if b.config is None else _output_config(b.config, spec, spec.out_dtype)

    with atomic_directory(out, overwrite=overwrite) as tmp:
        writer = ShardWriter(
            tmp, [TensorSpec(e.key, e.shape, e.dtype) for e in entries], max_shard_bytes=max_shard_bytes
        )
        pieces = _split(entries, inputs, chunk_elements)
        segments = collections.Counter(entry.key for piece in pieces for entry, _, _ in piece.segments)
        stream = _ahead(_pieces(pieces, inputs, coeffs, chunk_elements), depth=_PREFETCH)  # written while merged
        with (
            contextlib.closing(stream),
            tqdm(total=len(entries), unit="tensor", desc="merge", disable=not progress) as bar,
        ):
            for entry in entries:
                writer.write_stream(entry.key, itertools.islice(stream, segments[entry.key]))
                bar.update()
        writer.close()
        base_dir = b.reader.path if b.reader.path.is_dir() else b.reader.path.parent
        for item in sorted(base_dir.iterdir()):
            if item.is_file() and not item.name.startswith(".") and not _NOT_COPIED.fullmatch(item.name):
                shutil.copy2(item, tmp / item.name)
        if config is not None:
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / RECORD_FILE).write_text(spec.to_yaml(out_dtype))

    return MergeResult(
        out=out,
        merged=tuple(e.key for e in entries if e.merged),
        carried=tuple(e.key for e in entries if not e.merged),
        dropped=tuple((inp.model.path, k) for i, inp in enumerate(inputs) if i != base for k in inp.excluded),
    )
