"""The paper's adaptation variants (BidirLM §2, Figure 2), built from one causal base.

| variant                | attention     | made by                                                           |
|------------------------|---------------|-------------------------------------------------------------------|
| `Base`                 | causal        | nothing: the base directory itself                                |
| `Bi+Base`              | bidirectional | the base's files, its config switched to bidirectional attention  |
| `Bi+MNTP`              | bidirectional | an MNTP run from the base                                         |
| `Bi+MNTP+Merge`        | bidirectional | Bi+MNTP linearly merged with the base (`merge_ratio` on the base) |
| `Bi+Contrastive`       | bidirectional | a contrastive run from the base                                   |
| `Bi+MNTP+Contrastive`  | bidirectional | a contrastive run from Bi+MNTP (or from Bi+MNTP+Merge)            |
| `Omni` (on request)    | bidirectional | a variant composed with vision and audio specialists (`OmniStage`)|

Every variant is an HF directory with the tokenizer (`Variant.path`), in the attention mode it declares
(`Variant.attention`), so `from_pretrained(variant.path)`, transformers and `export_encoder` all read it as
is (`pipeline.stages` makes each directory). `build_variants(base, out_dir, recipe)` writes them under
`out_dir`:

    out_dir/variants.json             what was built, from what, with which settings
    out_dir/bi-base/ bi-mntp/ ...     the variants (HF directories)
    out_dir/runs/mntp/ ...            the training runs (checkpoints/, tensorboard/, metrics.jsonl)

Each directory is written atomically, so one that exists is finished: a second call reuses it (and an
interrupted run resumes from its last checkpoint; a preempted one raises `errors.Preempted`, building nothing
from it) — unless it was built with other settings, which is refused by name rather than silently mixed into
a comparison. The recipe's configs are whole training configs (`configs/mntp.py`, `configs/contrastive.py`),
so an ablation runs the variants at any size; the model-specific keys (`model.init_from`, `model.attention`)
are set here.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from bidirlm_jax.errors import ConfigError, Preempted
from bidirlm_jax.io.atomic import write_atomically
from bidirlm_jax.merge.omni_recipe import OmniRecipe
from bidirlm_jax.pipeline.stages import compose_omni, merge_with_base, run_to_hf, switch_attention

log = logging.getLogger(__name__)

BASE, BI_BASE, BI_MNTP, BI_MNTP_MERGE, BI_CONTRASTIVE, BI_MNTP_CONTRASTIVE = VARIANTS = (
    "Base",
    "Bi+Base",
    "Bi+MNTP",
    "Bi+MNTP+Merge",
    "Bi+Contrastive",
    "Bi+MNTP+Contrastive",
)
OMNI = "Omni"  # built only when asked for, from `Recipe.omni`
DIRECTORIES = {
    OMNI: "omni",
    BI_BASE: "bi-base",
    BI_MNTP: "bi-mntp",
    BI_MNTP_MERGE: "bi-mntp-merge",
    BI_CONTRASTIVE: "bi-contrastive",
    BI_MNTP_CONTRASTIVE: "bi-mntp-contrastive",
}
RUNS = {BI_MNTP: "mntp", BI_CONTRASTIVE: "contrastive", BI_MNTP_CONTRASTIVE: "mntp-contrastive"}
MANIFEST = "variants.json"
CONTRASTIVE_FROM = (BI_MNTP, BI_MNTP_MERGE)
# Config sections that change neither the data nor the weights a run produces (compared when reusing).
_NEUTRAL_KEYS = {
    "metrics": None,
    "distributed": None,
    "mesh": None,
    "data": ("read_threads", "prefetch"),
    "train": ("log_every", "checkpoint_every", "keep_checkpoints"),
    "evals": ("held_out",),  # measurements during the run (a validation that keeps the best step is not neutral)
    "mntp": ("eval_data", "eval_every", "eval_texts"),  # deprecated names of evals.held_out's settings
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One variant: its HF directory (weights, config in its attention mode, tokenizer) and provenance."""

    name: str
    path: Path
    attention: str
    parent: str | None = None  # the variant it was trained or merged from (None for the base)
    run: Path | None = None  # the training run that produced it (checkpoints, tensorboard, metrics.jsonl)
    contrastive: bool = False  # trained contrastively, with instructions on its queries

    def load(self, *, dtype: str = "float32"):
        """The model, in the variant's attention mode."""
        from bidirlm_jax.io.hf import from_pretrained

        return from_pretrained(self.path, attention=self.attention, dtype=dtype)

    def tokenizer(self):
        from bidirlm_jax.io.tokenizer import load_tokenizer

        return load_tokenizer(self.path)


def default_mntp_config() -> ConfigDict:
    from bidirlm_jax.configs import mntp

    return mntp.get_config("tiny")


def default_contrastive_config() -> ConfigDict:
    from bidirlm_jax.configs import contrastive

    return contrastive.get_config("tiny")


@dataclasses.dataclass(frozen=True)
class OmniStage:
    """The "compose" stage: the variant `text_from` merged with a vision specialist (a Qwen3-VL directory)
    and an audio specialist (a Qwen3-ASR directory) into BidirLM-Omni, backbones weighted `weights`
    (vision, text, audio), towers carried; `settings`: what the paper leaves open (`merge.omni_recipe`)."""

    vision: str
    audio: str
    text_from: str = BI_MNTP
    weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    settings: OmniRecipe = OmniRecipe()

    def __post_init__(self) -> None:
        if self.text_from not in VARIANTS[1:]:
            raise ConfigError(f"OmniStage.text_from {self.text_from!r} must be one of {', '.join(VARIANTS[1:])}")
        if len(self.weights) != 3:
            raise ConfigError(f"OmniStage.weights are (vision, text, audio), got {self.weights!r}")


@dataclasses.dataclass
class Recipe:
    """How the trained variants are made.

    `mntp` and `contrastive` are complete training configs (their data, steps, learning rates: any size);
    `model.init_from` and `model.attention` are overwritten per variant. `merge_ratio` is the paper's
    merging ratio: the weight on the *base* (0.5 was its best). `contrastive_from` is the starting point
    of `Bi+MNTP+Contrastive`: `Bi+MNTP` (Figure 2's variant) or `Bi+MNTP+Merge` (the released models'
    recipe). `omni`: the "compose" stage, which the `Omni` variant needs.
    """

    mntp: ConfigDict = dataclasses.field(default_factory=default_mntp_config)
    contrastive: ConfigDict = dataclasses.field(default_factory=default_contrastive_config)
    merge_ratio: float = 0.5
    contrastive_from: str = BI_MNTP
    omni: OmniStage | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.merge_ratio <= 1.0:
            raise ConfigError(f"merge_ratio {self.merge_ratio} must lie in [0, 1] (the weight on the base)")
        if self.contrastive_from not in CONTRASTIVE_FROM:
            raise ConfigError(f"contrastive_from {self.contrastive_from!r} must be one of {CONTRASTIVE_FROM}")
        if self.mntp.objective != "mntp" or self.contrastive.objective != "contrastive":
            raise ConfigError(
                "Recipe.mntp must be an MNTP config and Recipe.contrastive a contrastive one (got objectives "
                f"{self.mntp.objective!r} and {self.contrastive.objective!r}); use configs/mntp.py and "
                "configs/contrastive.py"
            )


def requirements(name: str, recipe: Recipe) -> list[str]:
    """The variants `name` is built from, in build order (not including `name`)."""
    parents = {
        BI_MNTP_MERGE: [BI_MNTP],
        BI_MNTP_CONTRASTIVE: [BI_MNTP] + ([BI_MNTP_MERGE] if recipe.contrastive_from == BI_MNTP_MERGE else []),
    }
    if name == OMNI:
        if recipe.omni is None:
            raise ConfigError("the Omni variant needs Recipe.omni (its vision and audio specialists)")
        return [*requirements(recipe.omni.text_from, recipe), recipe.omni.text_from]
    return parents.get(name, [])


def build_variants(
    base: str | os.PathLike,
    out_dir: str | os.PathLike,
    recipe: Recipe | None = None,
    *,
    names: Iterable[str] = VARIANTS,
    on_phase: Callable[[str, Variant, float], None] | None = None,
) -> dict[str, Variant]:
    """Build (or reuse) the variants `names` of the causal `base` (an HF directory with its tokenizer) under
    `out_dir`, with the variants they need; returns them in `VARIANTS` order.

    `on_phase(name, variant, seconds)` is called after each variant is ready (`seconds` = 0.0 when reused),
    e.g. to time or report the phases.
    """
    recipe = recipe or Recipe()
    base = Path(base).expanduser().resolve()
    out = Path(out_dir).expanduser().resolve()
    names = list(names)
    unknown = [n for n in names if n not in (*VARIANTS, OMNI)]
    if unknown:
        raise ConfigError(f"unknown variant(s) {unknown}; choose among {', '.join((*VARIANTS, OMNI))}")
    _check_base(base)
    wanted = {BASE} | {n for name in names for n in (name, *requirements(name, recipe))}
    built: dict[str, tuple[Variant, dict[str, Any]]] = {}
    out.mkdir(parents=True, exist_ok=True)
    for name in (*VARIANTS, OMNI):
        if name not in wanted:
            continue
        start = time.perf_counter()
        variant, reused = _build_one(name, base, out, recipe, built)
        if on_phase is not None:
            on_phase(name, variant, 0.0 if reused else time.perf_counter() - start)
    return {n: built[n][0] for n in (*VARIANTS, OMNI) if n in names}


def _check_base(base: Path) -> None:
    from bidirlm_jax.io.hf_config import read_runtime

    if not (base / "config.json").is_file():
        raise ConfigError(f"base {base} is not a Hugging Face model directory (no config.json); give the causal base")
    if not (base / "tokenizer.json").is_file():
        raise ConfigError(
            f"base {base} has no tokenizer.json; the variants carry the base's tokenizer (save it beside the weights)"
        )
    attention = read_runtime(base).attention
    if attention != "causal":
        raise ConfigError(f"base {base} declares {attention} attention; the variants start from a causal base")


def _build_one(
    name: str, base: Path, out: Path, recipe: Recipe, built: dict[str, tuple[Variant, dict[str, Any]]]
) -> tuple[Variant, bool]:
    """(the variant, whether an existing directory was reused); records it (and its settings) in `built`."""
    if name == BASE:
        built[name] = (Variant(BASE, base, "causal"), {"from": str(base)})
        return built[name][0], True
    path = out / DIRECTORIES[name]
    run = out / "runs" / RUNS[name] if name in RUNS else None
    parent = {
        BI_BASE: BASE,
        BI_MNTP: BASE,
        BI_MNTP_MERGE: BI_MNTP,
        BI_CONTRASTIVE: BASE,
        BI_MNTP_CONTRASTIVE: recipe.contrastive_from,
        OMNI: recipe.omni and recipe.omni.text_from,
    }[name]
    source = built[BASE][0].path if parent == BASE else built[parent][0].path
    variant = Variant(
        name, path, "bidirectional", parent=parent, run=run, contrastive=name in (BI_CONTRASTIVE, BI_MNTP_CONTRASTIVE)
    )
    settings = _settings(name, source, base, out, recipe)
    if parent != BASE:  # a rebuilt parent makes its children stale
        settings["parent"] = built[parent][1]
    built[name] = (variant, settings)
    manifest = _read_manifest(out)
    if (path / "config.json").is_file():
        recorded = manifest.get(name, {}).get("settings")
        difference = settings_difference(recorded, settings) if recorded is not None else ""
        if difference:
            raise ConfigError(
                f"{path} holds a {name} built with other settings ({difference}); remove it "
                "(and its run under runs/) to rebuild, or choose another output directory"
            )
        if recorded is None:
            _record(out, variant, settings)
        log.info("%s: reusing %s", name, path)
        return variant, True
    if name == BI_BASE:
        switch_attention(base, path, "bidirectional")
    elif name == BI_MNTP_MERGE:
        merge_with_base(source, base, path, base_weight=recipe.merge_ratio)
    elif name == OMNI:
        stage = recipe.omni
        compose_omni(source, stage.vision, stage.audio, path, weights=stage.weights, settings=stage.settings)
    else:
        config = _run_config(recipe.mntp if name == BI_MNTP else recipe.contrastive, source)
        from bidirlm_jax.evals.registry import EVALUATORS
        from bidirlm_jax.train import train

        if (result := train(config, str(run), evaluators=EVALUATORS))[
            "preempted"
        ]:  # half-trained: not exported nor recorded; resumable
            raise Preempted(run, result["step"])
        run_to_hf(run, path, attention="bidirectional", tokenizer_from=source)
    _record(out, variant, settings)
    return variant, False


def _run_config(template: ConfigDict, init_from: Path) -> ConfigDict:
    config = copy.deepcopy(template)
    config.model.init_from = str(init_from)
    config.model.attention = "bidirectional"
    return config


def _settings(name: str, source: Path, base: Path, out: Path, recipe: Recipe) -> dict[str, Any]:
    """What determines a variant's weights, as JSON values (compared when an existing one is reused). Paths
    inside `out` are recorded relative to it, so a moved or copied output directory stays reusable."""
    settings: dict[str, Any] = {"from": relative_path(source, out)}
    if name == BI_MNTP_MERGE:
        settings["base"], settings["base_weight"] = relative_path(base, out), recipe.merge_ratio
    elif name == OMNI:
        stage = recipe.omni
        settings.update(vision=stage.vision, audio=stage.audio, weights=list(stage.weights))
        settings["compose"] = stage.settings.to_dict()
    elif name in RUNS:
        config = json.loads(
            _run_config(recipe.mntp if name == BI_MNTP else recipe.contrastive, source).to_json_best_effort()
        )
        config["model"]["init_from"] = settings["from"]
        settings["config"] = relevant_settings(config)
    return settings


def relative_path(path: Path, out: Path) -> str:
    return path.relative_to(out).as_posix() if path.is_relative_to(out) else str(path)


def relevant_settings(config: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for section, value in config.items():
        neutral = _NEUTRAL_KEYS.get(section, ())
        if neutral is None:
            continue
        out[section] = {k: v for k, v in value.items() if k not in neutral} if isinstance(value, dict) else value
    return out


def settings_difference(recorded: dict[str, Any], settings: dict[str, Any], prefix: str = "", defaults=None) -> str:
    """How `settings` differ from `recorded` ("" when they agree). A key the record lacks that holds the
    engine's default is no difference: it was added to the engine after the record, as its old behaviour."""
    defaults = _engine_defaults() if defaults is None else defaults
    diffs = []
    for key in sorted(set(recorded) | set(settings)):
        a, b = recorded.get(key), settings.get(key)
        default = defaults.get(key) if isinstance(defaults, dict) else None
        if isinstance(a, dict) and isinstance(b, dict):
            inner = settings_difference(a, b, f"{prefix}{key}.", default if isinstance(default, dict) else {})
            if inner:
                diffs.append(inner)
        elif key not in recorded and isinstance(defaults, dict) and key in defaults and b == default:
            continue
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} then, {b!r} now")
    return "; ".join(diffs)


@functools.cache
def _engine_defaults() -> dict[str, Any]:
    """The defaults of recorded settings: every config key's, as JSON values (the engine's, and each
    objective section's from its tiny preset)."""
    from bidirlm_jax.configs import finetune

    merged: dict[str, Any] = {}
    for config in (default_mntp_config(), default_contrastive_config(), finetune.get_config("tiny")):
        for section, value in json.loads(config.to_json_best_effort()).items():
            merged.setdefault(section, value)
    settings: dict[str, Any] = {"config": merged}  # settings nest a run's config, and their parent's settings
    settings["parent"] = settings
    return settings


def _read_manifest(out: Path) -> dict[str, Any]:
    path = out / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(
            f"{path} is not valid JSON ({e}); remove it (the variants' directories stay usable)"
        ) from None


def _record(out: Path, variant: Variant, settings: dict[str, Any]) -> None:
    manifest = _read_manifest(out)
    manifest[variant.name] = {
        "path": os.path.relpath(variant.path, out),
        "attention": variant.attention,
        "parent": variant.parent,
        "run": os.path.relpath(variant.run, out) if variant.run else None,
        "settings": settings,
    }
    write_atomically(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
