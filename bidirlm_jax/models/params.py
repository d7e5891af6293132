"""Parameter counts computed abstractly: `jax.eval_shape` builds no arrays, so a 32B model costs nothing."""

from __future__ import annotations

import math

import jax
from flax import nnx

from bidirlm_jax.models.config import ModelConfig
from bidirlm_jax.models.transformer import abstract_model


def param_count(config: ModelConfig) -> int:
    """Parameters of the model `config` describes; tied weights once (`bidirlm_jax.param_count` also reads files)."""
    _, state = abstract_model(config)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state.filter(nnx.Param)))
