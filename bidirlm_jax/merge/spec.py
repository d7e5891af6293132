"""The recipe: what `bidirlm merge` merges (`MergeSpec`), and its mergekit `merge_method: linear` YAML form.

The YAML schema is mergekit's (`models[].model`, `models[].parameters.weight`, `parameters.normalize`,
`dtype`, `out_dtype`, `base_model`), so a mergekit recipe runs unchanged; options mergekit lacks live
in a `bidirlm:` section, which mergekit ignores. Anything else in the file is refused by name rather
than silently ignored, because a merge that quietly differs from its recipe is worse than no merge.

mergekit's `dtype:` is its *compute* dtype: it rounds every input to it before merging. By default we
merge the stored values in float32 instead (`arithmetic="float32"`), so `dtype:` only names the output
dtype when `out_dtype:` is absent, as it does in mergekit; `arithmetic="mergekit"` replays mergekit's
arithmetic exactly, `dtype:` included (`bidirlm_jax.merge.mergekit_linear`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.merge.omni_recipe import OmniRecipe, recipe_from_dict
from bidirlm_jax.models.runtime import ATTENTION_MODES, BIDIRECTIONAL_WINDOWS, DTYPES
from bidirlm_jax.paths import user_path

RECORD_FILE = "mergekit_config.yml"  # the recipe, written beside the merged weights
ARITHMETICS = ("float32", "mergekit")  # ours (float32 from the stored values), or mergekit's replayed
# the usual short forms of mergekit's dtype names
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}

_TOP_KEYS = {
    "merge_method",
    "models",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer",
    "tokenizer_source",
    "bidirlm",
}
_BIDIRLM_KEYS = {"exclude", "key_patterns", "attention", "bidirectional_window", "arithmetic", "compose"}


def canonical_dtype(name: str) -> str:
    """`float32`/`float16`/`bfloat16` for any accepted spelling of a floating dtype."""
    key = str(name).lower().removeprefix("torch.")
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return key


@dataclass(frozen=True)
class MergeModel:
    """One input: a local checkpoint directory, its weight, and optionally how its backbone keys are named.

    `key_pattern` is a regex matched against the whole checkpoint key; its first capture group that
    matched is the backbone-relative name ("layers.0.mlp.up_proj.weight", "lm_head.weight"), e.g.
    `language_model\\.model\\.(.+)|language_model\\.(lm_head\\.weight)`. Without it the layout is
    detected (`bidirlm_jax.io.layouts`).
    """

    path: str
    weight: float
    key_pattern: str | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "weight", float(self.weight))
        except (TypeError, ValueError):
            raise ConfigError(f"weight of {self.path} must be a number, got {self.weight!r}") from None
        if self.key_pattern is not None:
            try:
                groups = re.compile(self.key_pattern).groups
            except re.error as e:
                raise ConfigError(
                    f"key pattern {self.key_pattern!r} for {self.path} is not a valid regex: {e}"
                ) from None
            if groups == 0:
                raise ConfigError(
                    f"key pattern {self.key_pattern!r} for {self.path} needs a capture group around the "
                    "backbone-relative name, e.g. 'model\\.text\\.(.+)'"
                )


@dataclass(frozen=True)
class MergeSpec:
    """A linear merge θ = Σ wᵢθᵢ / Σ wᵢ (or Σ wᵢθᵢ without `normalize`) and what the output looks like.

    `base` (default: the first model) gives the output its key layout, config.json, tokenizer files
    and the tensors only it has. Merged tensors are written in `out_dtype`, else `dtype`, else the
    base's dtype (mergekit arithmetic: the inputs' common dtype); carried-through ones are copied bit for
    bit. `dtype` is mergekit's compute dtype, which only `arithmetic="mergekit"` rounds the inputs to.
    `exclude` holds regexes of checkpoint keys that are not merged: the base's are carried through, the
    other models' dropped. `attention` (default: as in the base's config) sets the output's attention mode.
    `compose` makes the output a BidirLM-Omni checkpoint instead (`merge.compose`): the backbones merged,
    the towers carried from the inputs the recipe names, its own layout, config and files.
    """

    models: tuple[MergeModel, ...]
    base: str | None = None
    normalize: bool = True
    out_dtype: str | None = None
    exclude: tuple[str, ...] = ()
    attention: str | None = None
    bidirectional_window: str | None = None
    dtype: str | None = None
    arithmetic: str = "float32"
    compose: OmniRecipe | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if not self.models:
            raise ConfigError("nothing to merge: give at least one --model PATH=WEIGHT (or `models:` in the YAML)")
        if not isinstance(self.normalize, bool):
            raise ConfigError(f"normalize must be true or false, got {self.normalize!r}")
        for name in ("out_dtype", "dtype"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, canonical_dtype(getattr(self, name)))
        if self.arithmetic not in ARITHMETICS:
            raise ConfigError(f"arithmetic must be one of {', '.join(ARITHMETICS)}, got {self.arithmetic!r}")
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"exclude pattern {pattern!r} is not a valid regex: {e}") from None
        if self.attention not in (None, *ATTENTION_MODES):
            raise ConfigError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {self.attention!r}")
        if self.bidirectional_window not in (None, *BIDIRECTIONAL_WINDOWS):
            raise ConfigError(
                f"bidirectional_window must be one of {', '.join(BIDIRECTIONAL_WINDOWS)}, got {self.bidirectional_window!r}"
            )
        if self.bidirectional_window is not None and self.attention != "bidirectional":
            raise ConfigError("bidirectional_window only applies with attention 'bidirectional'")
        if self.compose is not None and self.attention not in (None, "bidirectional"):
            raise ConfigError("a BidirLM-Omni composition is bidirectional; drop attention or set it to bidirectional")
        self.base_index  # noqa: B018  (validates `base`)

    @property
    def base_index(self) -> int:
        """Index in `models` of the output's base."""
        if self.base is None:
            return 0
        for i, model in enumerate(self.models):
            if same_path(model.path, self.base):
                return i
        raise ConfigError(
            f"base model {self.base} is not one of the merged models ({', '.join(m.path for m in self.models)}); "
            "add it to the models (a weight of 0 takes only its layout, config and extra tensors)"
        )

    @property
    def output_dtype(self) -> str | None:
        """The dtype of every merged tensor, when the recipe names one (mergekit's rule)."""
        return self.out_dtype or self.dtype

    def replace(self, **changes: Any) -> MergeSpec:
        return dataclasses.replace(self, **changes)

    def to_yaml(self, out_dtype: str | None = None) -> str:
        """The merge as a mergekit `linear` recipe (plus a `bidirlm:` section mergekit ignores).

        Our float32 arithmetic casts once at the end, which is closest to mergekit's `dtype: float32` +
        `out_dtype`; mergekit arithmetic keeps the recipe's `dtype`. `out_dtype` is the dtype the merged
        tensors were written in (None when they kept mixed dtypes).
        """
        doc: dict[str, Any] = {
            "merge_method": "linear",
            "base_model": self.models[self.base_index].path,
            "models": [{"model": m.path, "parameters": {"weight": m.weight}} for m in self.models],
            "parameters": {"normalize": self.normalize},
        }
        out_dtype = self.output_dtype or out_dtype
        compute_dtype = self.dtype if self.arithmetic == "mergekit" else "float32"
        if out_dtype is not None:
            doc.update({"dtype": compute_dtype, "out_dtype": out_dtype} if compute_dtype else {"out_dtype": out_dtype})
        extra: dict[str, Any] = {}
        if self.arithmetic != "float32":
            extra["arithmetic"] = self.arithmetic
        if self.exclude:
            extra["exclude"] = list(self.exclude)
        patterns = {m.path: m.key_pattern for m in self.models if m.key_pattern is not None}
        if patterns:
            extra["key_patterns"] = patterns
        if self.attention is not None:
            extra["attention"] = self.attention
        if self.bidirectional_window is not None:
            extra["bidirectional_window"] = self.bidirectional_window
        if self.compose is not None:
            extra["compose"] = self.compose.to_dict()
        if extra:
            doc["bidirlm"] = extra
        return yaml.safe_dump(doc, sort_keys=False)


def same_path(a: str, b: str) -> bool:
    return a == b or os.path.realpath(user_path(a)) == os.path.realpath(user_path(b))


def parse_model_arg(text: str) -> MergeModel:
    """`PATH=WEIGHT` from the command line (split at the last `=`)."""
    path, sep, weight = text.rpartition("=")
    if not sep or not path:
        raise ConfigError(f"--model expects PATH=WEIGHT (e.g. ./encoder=0.5), got {text!r}")
    try:
        return MergeModel(str(user_path(path)), float(weight))
    except ValueError:
        raise ConfigError(f"--model {text!r}: weight {weight!r} is not a number") from None


def _with_key_patterns(models: Sequence[MergeModel], patterns: dict[str, str]) -> tuple[MergeModel, ...]:
    unused = [p for p in patterns if not any(same_path(m.path, p) for m in models)]
    if unused:
        raise ConfigError(f"key pattern given for {', '.join(unused)}, which is not one of the merged models")
    return tuple(
        dataclasses.replace(
            m, key_pattern=next((r for p, r in patterns.items() if same_path(m.path, p)), m.key_pattern)
        )
        for m in models
    )


def _mapping(value: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping, got {value!r}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unsupported key(s) {', '.join(unknown)} (supported: {', '.join(sorted(allowed))})")
    return value


def load_merge_yaml(path: str | os.PathLike) -> MergeSpec:
    """A `MergeSpec` from a mergekit `merge_method: linear` YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"merge config {path} does not exist")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} must hold a mapping with `merge_method: linear` and `models:`")
    if "slices" in doc or "modules" in doc:
        raise ConfigError(f"{path}: `slices:`/`modules:` recipes are not supported; list whole models under `models:`")
    doc = _mapping(doc, str(path), _TOP_KEYS)
    if doc.get("merge_method") != "linear":
        raise ConfigError(
            f"{path}: merge_method {doc.get('merge_method')!r} is not supported; bidirlm merge does `linear`"
        )
    params = _mapping(doc.get("parameters"), f"{path}: parameters", {"normalize", "weight"})
    tokenizer = _mapping(doc.get("tokenizer"), f"{path}: tokenizer", {"source"}).get(
        "source", doc.get("tokenizer_source")
    )
    if tokenizer not in (None, "base"):
        raise ConfigError(
            f"{path}: tokenizer source {tokenizer!r} is not supported; the output takes the base model's tokenizer, "
            "so every model must share it (use `source: base` or leave it out)"
        )
    if not isinstance(doc.get("models"), list) or not doc["models"]:
        raise ConfigError(f"{path}: `models:` must list the models to merge")
    models = []
    for i, entry in enumerate(doc["models"]):
        entry = _mapping(entry, f"{path}: models[{i}]", {"model", "parameters"})
        if not isinstance(entry.get("model"), str):
            raise ConfigError(f"{path}: models[{i}].model must be a local directory path")
        model_params = _mapping(entry.get("parameters"), f"{path}: models[{i}].parameters", {"weight"})
        weight = model_params.get("weight", params.get("weight"))
        if weight is None:
            raise ConfigError(f"{path}: models[{i}] ({entry['model']}) has no parameters.weight")
        if isinstance(weight, (list, dict, bool)):
            raise ConfigError(
                f"{path}: models[{i}] weight {weight!r}: only a single number per model is supported "
                "(no layer gradients or per-tensor filters)"
            )
        models.append(MergeModel(str(user_path(entry["model"])), weight))
    extra = _mapping(doc.get("bidirlm"), f"{path}: bidirlm", _BIDIRLM_KEYS)
    exclude = extra.get("exclude", [])
    if isinstance(exclude, str):
        exclude = [exclude]
    patterns = extra.get("key_patterns") or {}
    if not isinstance(patterns, dict) or not all(isinstance(v, str) for v in patterns.values()):
        raise ConfigError(f"{path}: bidirlm.key_patterns must map model paths to regexes")
    return MergeSpec(
        models=_with_key_patterns(models, patterns),
        base=doc.get("base_model"),
        normalize=params.get("normalize", True),
        out_dtype=doc.get("out_dtype"),
        exclude=tuple(exclude),
        attention=extra.get("attention"),
        bidirectional_window=extra.get("bidirectional_window"),
        dtype=doc.get("dtype"),
        arithmetic=extra.get("arithmetic", "float32"),
        compose=None if "compose" not in extra else _recipe(extra["compose"], f"{path}: bidirlm.compose"),
    )


def _recipe(d: Any, where: str) -> OmniRecipe:
    """The composition settings with their input paths resolved as the models' are."""
    recipe = recipe_from_dict(d, where)
    paths = {k: str(user_path(v)) for k in ("vision", "audio", "tokenizer") if (v := getattr(recipe, k)) is not None}
    return recipe.replace(**paths)


def spec_from_args(
    *,
    models: Iterable[str] = (),
    config: str | None = None,
    base: str | None = None,
    normalize: bool | None = None,
    out_dtype: str | None = None,
    exclude: Iterable[str] = (),
    key_patterns: Iterable[str] = (),
    attention: str | None = None,
    bidirectional_window: str | None = None,
    arithmetic: str | None = None,
    compose: dict[str, Any] | None = None,
) -> MergeSpec:
    """The spec `bidirlm merge` runs: `--config` YAML or `--model PATH=WEIGHT`s, with flags taking precedence;
    `compose`: composition settings given as flags (they replace the YAML's one by one)."""
    models = list(models)
    if config and models:
        raise ConfigError("give either --config FILE.yaml or --model PATH=WEIGHT options, not both")
    if config:
        spec = load_merge_yaml(config)
    elif models:
        spec = MergeSpec(tuple(parse_model_arg(m) for m in models))
    else:
        raise ConfigError("nothing to merge: give --model PATH=WEIGHT (two or more) or --config FILE.yaml")
    patterns = {}
    for item in key_patterns:
        path, sep, regex = item.partition("=")
        if not sep or not path or not regex:
            raise ConfigError(f"--key-pattern expects PATH=REGEX, got {item!r}")
        patterns[path] = regex
    changes: dict[str, Any] = {
        "exclude": spec.exclude + tuple(exclude),
        "models": _with_key_patterns(spec.models, patterns),
    }
    flags = {
        "base": base,
        "normalize": normalize,
        "out_dtype": out_dtype,
        "attention": attention,
        "bidirectional_window": bidirectional_window,
        "arithmetic": arithmetic,
    }
    changes.update({name: value for name, value in flags.items() if value is not None})
    if compose is not None:
        given = {k: v for k, v in compose.items() if v is not None}
        current = spec.compose.to_dict() if spec.compose is not None else {}
        changes["compose"] = _recipe({**current, **given}, "--compose settings")
    return spec.replace(**changes)
