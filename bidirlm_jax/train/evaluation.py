"""Evaluations during a run, as the engine sees them, and `config.evals`, where a run names them.

`config.evals` is a registry in big_vision's style: `evals.NAME = {kind, data, every, …}`, one entry per
evaluation, each `kind` a registered evaluator. An entry whose `data` is empty is off. The engine knows no
evaluation: whoever runs it passes the registry of kinds (`evaluators`: kind → factory; `bidirlm train`, the
pipeline and the ablation harness pass `evals.registry.EVALUATORS`), and each factory `(name, spec, config,
objective) → Evaluation` is called before the first step, so bad evaluation data is refused before anything
is written. So training imports nothing from `evals/`, and evaluation nothing from `train/`.

Each evaluation runs every `every` steps (0: the last step only) and at the last step; its scores are logged
as `eval/<key>` (`eval/<prefix><key>` for an evaluation with a `prefix`), and the one evaluation naming a `best_metric` keeps its best step (`checkpoints.BestStep`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from flax import nnx
from ml_collections import ConfigDict

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.train.checkpoints import BestStep

log = logging.getLogger(__name__)


class Evaluation(Protocol):
    """What an evaluator factory returns: scores of the current model, and when to take them."""

    name: str
    every: int  # steps between evaluations (0: the last step only)
    best_metric: str  # the score whose best step is kept in `RUN/best/` ("" for none; higher is better)

    def __call__(self, model: nnx.Module) -> Mapping[str, float]: ...


# (entry name, entry spec, the run's config, the run's objective) -> the evaluation, or None when off
EvaluatorFactory = Callable[[str, ConfigDict, ConfigDict, Any], "Evaluation | None"]

# Objective settings that named evaluations before `config.evals` -> (entry, key, how the value maps).
LEGACY_KEYS: dict[str, tuple[str, str, Callable[[Any], Any]]] = {
    "mntp.eval_data": ("held_out", "data", str),
    "mntp.eval_every": ("held_out", "every", int),
    "mntp.eval_texts": ("held_out", "texts", int),
    "finetune.validation_path": ("validation", "data", lambda v: v or "auto"),  # "" meant: the dataset's own split
    "finetune.validation_split": ("validation", "split", str),
    "finetune.eval_every": ("validation", "every", int),
    "finetune.eval_batch_size": ("validation", "batch_size", int),
    "finetune.best_metric": ("validation", "best_metric", str),
}


def eval_specs(config: ConfigDict) -> dict[str, ConfigDict]:
    """`config.evals`' entries that are on (non-empty `data`), with the deprecated objective keys a config
    still sets mapped into their entries (a warning each)."""
    specs = {name: ConfigDict(spec.to_dict()) for name, spec in config.get("evals", ConfigDict()).items()}
    for dotted, (entry, key, convert) in LEGACY_KEYS.items():
        section, name = dotted.split(".")
        value = config[section].get(name) if section in config else None
        if value is None:
            continue
        if entry not in specs:
            raise ConfigError(
                f"--config.{dotted} is deprecated and stands for evals.{entry}.{key}, but this config has no "
                f"evals.{entry} entry; add one (see configs/{section}.py)"
            )
        log.warning("--config.%s is deprecated: it sets evals.%s.%s, set that instead", dotted, entry, key)
        specs[entry][key] = convert(value)
    return {name: spec for name, spec in specs.items() if spec.get("data")}


def build_evaluations(
    config: ConfigDict, objective: Any, evaluators: Mapping[str, EvaluatorFactory] | None
) -> list[Evaluation]:
    """The run's evaluations, each built (its data read and checked) by its kind's factory."""
    specs = eval_specs(config)
    if specs and evaluators is None:
        raise ConfigError(
            f"config.evals names evaluations ({', '.join(sorted(specs))}) but no evaluators were given: run "
            "`bidirlm train`, or call train(config, workdir, evaluators=bidirlm_jax.evals.registry.EVALUATORS)"
        )
    out = []
    for name, spec in specs.items():
        kind = spec.get("kind", "")
        if kind not in evaluators:
            raise ConfigError(f"evals.{name}.kind={kind!r} is not one of {sorted(evaluators)}")
        if int(spec.get("every", 0)) < 0:
            raise ConfigError(f"evals.{name}.every must be 0 (the last step only) or positive, got {spec.every}")
        evaluation = evaluators[kind](name, spec, config, objective)
        if evaluation is not None:
            out.append(evaluation)
    keeping = [e.name for e in out if e.best_metric]
    if len(keeping) > 1:
        raise ConfigError(f"evaluations {keeping} each name a best_metric; one run keeps one best step")
    return out


class Schedule:
    """Runs the evaluations that are due at a step (each every `every` steps, all at the last one), merges
    their scores as `eval/<key>`, and offers the best-keeping one's to `BestStep`."""

    def __init__(self, evaluations: list[Evaluation], workdir: Path, last_step: int):
        self._evaluations, self._last = evaluations, last_step
        keeping = [e for e in evaluations if e.best_metric]
        self._best = BestStep(workdir, keeping[0].best_metric) if keeping else None

    def _due(self, evaluation: Evaluation, step: int) -> bool:
        return step == self._last or bool(evaluation.every and step % evaluation.every == 0)

    def due(self, step: int) -> bool:
        return any(self._due(e, step) for e in self._evaluations)

    def run(self, step: int, model: nnx.Module, params: nnx.State) -> dict[str, float]:
        out: dict[str, float] = {}
        for evaluation in self._evaluations:
            if not self._due(evaluation, step):
                continue
            scores = dict(evaluation(model))
            prefix = getattr(evaluation, "prefix", "")
            for key, value in scores.items():
                logged = f"eval/{prefix}{key}"
                if logged in out:
                    raise ConfigError(f"two evaluations log {logged} (the second: {evaluation.name}); rename one")
                out[logged] = float(value)
            if evaluation.best_metric and self._best is not None:
                self._best.offer(step, params, scores)
        return out
