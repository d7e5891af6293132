"""Training objectives, chosen by `config.objective`: each module's `build(config, model, workdir=...)`
returns an `Objective` (its data, gradient strategy, FLOPs and reporting; see `base`)."""

from __future__ import annotations

import importlib
from pathlib import Path

from ml_collections import ConfigDict

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models.config import ModelConfig
from bidirlm_jax.train.objectives.base import Batch, GradFn, LossFn, Objective, token_sum_grads

OBJECTIVES = {
    "causal_lm": "bidirlm_jax.train.objectives.causal_lm",
    "mntp": "bidirlm_jax.train.objectives.mntp",
    "contrastive": "bidirlm_jax.train.objectives.contrastive",
    "classification": "bidirlm_jax.train.objectives.finetune",
    "regression": "bidirlm_jax.train.objectives.finetune",
    "token_classification": "bidirlm_jax.train.objectives.finetune",
}

__all__ = [
    "OBJECTIVES",
    "Batch",
    "GradFn",
    "LossFn",
    "Objective",
    "build_objective",
    "check_objective",
    "token_sum_grads",
]


def check_objective(name: str) -> None:
    if name not in OBJECTIVES:
        raise ConfigError(f"objective {name!r} is not one of {sorted(OBJECTIVES)}; fix --config.objective")


def build_objective(config: ConfigDict, model: ModelConfig, *, workdir: Path) -> Objective:
    """The objective `config.objective` names, built for `model` (modules are imported on demand)."""
    check_objective(config.objective)
    return importlib.import_module(OBJECTIVES[config.objective]).build(config, model, workdir=workdir)
