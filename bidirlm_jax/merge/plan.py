"""Planning a streamed merge: open the inputs, match their tensors, and decide the output before writing.

Every tensor of every input is accounted for: merged (all models have it, in a dtype we can average),
carried through bit for bit (only the base has it, it is excluded, or it is an integer, bool or fp8
buffer that every model holds identically), dropped (excluded, not the base's) — anything else is an
error that names the tensors. The base also gives the output its config.json and the files that travel with
weights (`io.companions`: tokenizer, processors, sentence-transformers modules in subdirectories, …).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bidirlm_jax.errors import CheckpointError, ConfigError
from bidirlm_jax.io.companions import Companions, companion_files
from bidirlm_jax.io.hf_config import norm_plus_one, set_attention_mode
from bidirlm_jax.io.layouts import LM_HEAD, detect_layout
from bidirlm_jax.io.run import description_dir
from bidirlm_jax.io.shards import ShardReader
from bidirlm_jax.io.weights.readers import open_weights
from bidirlm_jax.merge.linear import listing
from bidirlm_jax.merge.spec import RECORD_FILE, MergeModel, MergeSpec
from bidirlm_jax.models.runtime import DTYPES

MERGEABLE = {name: jnp.dtype(name) for name in DTYPES}  # what both arithmetics average (float64: ours, under x64)
_DTYPE_NAMES = {dtype: name for name, dtype in MERGEABLE.items()}
# config.json fields that define the text backbone's tensors; they must agree between merged models.
_ARCH_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)

# A tensor's identity across models: ("backbone", backbone-relative name) or ("other", checkpoint key).
_Name = tuple[str, str]


@dataclass
class Input:
    """One model of the merge: its weights, its config.json and which of its tensors go where."""

    model: MergeModel
    reader: ShardReader  # or io.weights' pickle or orbax (checkpoint, training run) reader, behind its interface
    config: dict | None
    names: dict[_Name, str] = field(default_factory=dict)  # identity -> checkpoint key (not excluded)
    excluded: list[str] = field(default_factory=list)

    @property
    def directory(self) -> Path:
        """Where its config.json and other files are (a training run's `model/`)."""
        path = Path(self.model.path)
        return description_dir(path) if path.is_dir() else path.parent

    @property
    def text_config(self) -> dict:
        holder = (self.config or {}).get("thinker_config") or self.config or {}  # the original Qwen3-ASR nests it
        return holder.get("text_config") or self.config or {}

    def describe(self) -> str:
        t = self.text_config
        kind = t.get("model_type") or (self.config or {}).get("model_type") or "unknown architecture"
        return (
            f"{self.model.path} ({kind}, {t.get('num_hidden_layers', '?')} layers, hidden {t.get('hidden_size', '?')})"
        )


@dataclass(frozen=True)
class Entry:
    """One output tensor: the base's key, and the (model, key) pairs it is computed from."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    sources: tuple[tuple[int, str], ...]  # every model in order (merged) or the one it is copied from (carried)
    merged: bool
    rows: tuple[tuple[int, int], ...] = ()  # (row, model) of a merged matrix copied from that model instead

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Plan:
    """Everything a streamed merge writes, decided and checked before anything is written."""

    spec: MergeSpec
    inputs: list[Input]
    entries: list[Entry]  # in the base's storage order
    files: Companions  # the base's files that travel (io.companions), copied as they are
    config: dict | None  # the output's config.json
    out_dtype: str | None  # of every merged tensor, when they share one
    documents: dict[str, dict] = field(default_factory=dict)  # other JSON files the merge composes, by name
    dropped: tuple[tuple[str, str], ...] = ()  # (model path, key) left out besides other models' excluded keys

    @property
    def base(self) -> Input:
        return self.inputs[self.spec.base_index]


def open_input(model: MergeModel, allow_pickle: bool) -> Input:
    path = Path(model.path)
    if not path.exists():
        raise CheckpointError(
            f"model path {model.path} does not exist; bidirlm merge reads local checkpoint directories "
            "(download hub models first, e.g. with `hf download`)"
        )
    reader = ShardReader(path) if path.is_file() else open_weights(path, allow_pickle=allow_pickle)
    inp = Input(model, reader, None)
    config_file = inp.directory / "config.json"
    if config_file.is_file():
        try:
            inp.config = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_file} is not valid JSON: {e}") from None
    return inp


def _key_mapper(inp: Input) -> Callable[[str], str | None]:
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


def index_input(inp: Input, exclude: Sequence[re.Pattern]) -> None:
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


def check_configs(inputs: list[Input]) -> None:
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
            f"{listing(diffs)}\nmodels: " + "; ".join(inp.describe() for inp in inputs)
        )


def _warn_gemma_norms(inputs: list[Input], spec: MergeSpec) -> None:
    """Gemma's RMSNorm applies (1 + w): Σ wᵢθᵢ gives the norms the intended scale only when Σ wᵢ = 1."""
    total = sum(m.weight for m in spec.models)
    gemma = any(norm_plus_one(inp.text_config) for inp in inputs)
    if gemma and not spec.normalize and abs(total - 1) > 1e-6:
        warnings.warn(
            f"unnormalised weights summing to {total:g} on a Gemma model: its norms store w and apply (1 + w), "
            f"so the merged norms' scale is off by {1 - total:+g} from the weighted sum of the inputs' scales",
            stacklevel=4,
        )


def _ties_embeddings(inp: Input) -> bool:
    t, top = inp.text_config, inp.config or {}
    return bool(t.get("tie_word_embeddings", top.get("tie_word_embeddings", True)))  # transformers' default


def _mergeable(dtype: np.dtype, arithmetic: str) -> bool:
    """Whether the merge can average tensors of `dtype`; others (integers, bool, fp8) are only carried."""
    if dtype == np.float64:
        return arithmetic == "float32" and bool(jax.config.jax_enable_x64)
    return dtype in _DTYPE_NAMES


def _check_identical(inputs: list[Input], row: list[str]) -> None:
    """Tensors we cannot average are carried through when every model agrees, else refused."""
    first = inputs[0].reader.read_flat(row[0])
    for i, k in enumerate(row[1:], start=1):
        other = inputs[i].reader.read_flat(k)
        if other.dtype != first.dtype or not np.array_equal(other.view(np.uint8), first.view(np.uint8)):
            dtypes = " / ".join(sorted({str(first.dtype), str(other.dtype)}))
            hint = "; float64 merges under jax x64, in the default arithmetic" if "float64" in dtypes else ""
            raise ConfigError(
                f"{row[0]} ({dtypes}) cannot be averaged{hint}, and it differs between "
                f"{inputs[0].model.path} and {inputs[i].model.path}; --exclude it to keep the base's"
            )


def _entries(inputs: list[Input], spec: MergeSpec) -> list[Entry]:
    """Every output tensor, in the base's storage order, after checking that nothing would be lost."""
    base = spec.base_index
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

    def buffer(name: _Name) -> bool:  # a base tensor no model could have trained: carried wherever it is
        return not _mergeable(b.reader.info(b.names[name]).dtype, spec.arithmetic)

    architecture = []  # backbone tensors that not every model has
    lost = []  # tensors the output would drop or only half-merge
    for name, row in sources_of.items():
        lacking = [inputs[i].model.path for i, k in enumerate(row) if k is None]
        if lacking and name[0] == "backbone" and not (len(lacking) == len(inputs) - 1 and buffer(name)):
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
            f"{listing(architecture)}\nmodels: "
            + "; ".join(inp.describe() for inp in inputs)
            + "\nmerge checkpoints of one architecture, or --exclude REGEX the tensors to take from the base only"
        )
    if lost:
        raise ConfigError(
            f"tensors that would be lost or half-merged (the base, {b.model.path}, decides the output's tensors):"
            f"{listing(lost)}\nmake the model that has them the base (--base / base_model), "
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
            f"tensors whose shapes differ between the models:{listing(bad_shapes)}\n"
            "--exclude REGEX them to keep only the base's copy"
        )

    target = None if spec.output_dtype is None else MERGEABLE[spec.output_dtype]
    entries = []
    for name, row in sources_of.items():
        key = b.names[name]
        info = b.reader.info(key)
        merged = all(k is not None for k in row) and len(inputs) > 1
        dtypes = [inputs[i].reader.info(k).dtype for i, k in enumerate(row)] if merged else []
        if merged and not all(_mergeable(d, spec.arithmetic) for d in dtypes):
            _check_identical(inputs, row)
            merged = False
        if not merged:
            entries.append(Entry(key, info.shape, info.dtype, ((base, key),), False))
            continue
        # unless the recipe names it, the output keeps the base's dtype (mergekit: the inputs' common one)
        fallback = functools.reduce(jnp.promote_types, dtypes) if spec.arithmetic == "mergekit" else info.dtype
        entries.append(Entry(key, info.shape, target or np.dtype(fallback), tuple(enumerate(row)), True))
    for key in b.excluded:
        info = b.reader.info(key)
        entries.append(Entry(key, info.shape, info.dtype, ((base, key),), False))
    entries.sort(key=lambda e: (str(b.reader.info(e.key).file), b.reader.info(e.key).offset))
    return entries


def _output_config(config: dict, spec: MergeSpec) -> dict:
    """The base's config.json with the merge's attention mode and dtype."""
    config = copy.deepcopy(config)
    if spec.attention is not None:
        config = set_attention_mode(config, spec.attention, spec.bidirectional_window)
    if spec.output_dtype is not None:
        config["dtype"] = spec.output_dtype  # transformers 5's key; older ones wrote torch_dtype
        for d in (config, config.get("text_config") or {}):
            for key in ("dtype", "torch_dtype"):
                if key in d:
                    d[key] = spec.output_dtype
    return config


def plan_merge(spec: MergeSpec, out: str | os.PathLike, *, allow_pickle: bool = False) -> Plan:
    """Open every input and decide every output tensor and file, refusing anything that would be lost."""
    exclude = [re.compile(p) for p in spec.exclude]
    inputs = [open_input(m, allow_pickle) for m in spec.models]
    b = inputs[spec.base_index]
    if spec.attention is not None and b.config is None:
        raise ConfigError(f"cannot set the attention mode: the base {b.model.path} has no config.json")
    for inp in inputs:
        index_input(inp, exclude)
    check_configs(inputs)
    _warn_gemma_norms(inputs, spec)
    entries = _entries(inputs, spec)
    merged_dtypes = {_DTYPE_NAMES.get(e.dtype) for e in entries if e.merged}
    return Plan(
        spec=spec,
        inputs=inputs,
        entries=entries,
        files=companion_files(
            b.model.path if Path(b.model.path).is_dir() else b.directory,
            owned=re.escape(RECORD_FILE),  # the output's recipe is its own
            subdirectories=Path(b.model.path).is_dir(),
            skip=Path(out),
        ),
        config=None if b.config is None else _output_config(b.config, spec),
        out_dtype=spec.output_dtype or (merged_dtypes.pop() if len(merged_dtypes) == 1 else None),
    )
