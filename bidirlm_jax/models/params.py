"""Parameter counts computed abstractly: `jax.eval_shape` builds no arrays, so a 32B model costs nothing."""

from __future__ import annotations

import math
import os

import jax
from flax import nnx

from bidirlm_jax.models.config import ModelConfig
from bidirlm_jax.models.transformer import abstract_model
from bidirlm_jax.paths import user_path


def param_count(path_or_config: str | os.PathLike | ModelConfig) -> int:
    """Parameters of the model a config (or a config.json / a directory holding one) describes; tied weights once."""
    config = path_or_config
    if not isinstance(config, ModelConfig):
        from bidirlm_jax.io.hf_config import read_config  # the model package knows no file format

        config = read_config(user_path(path_or_config))
    _, state = abstract_model(config)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state.filter(nnx.Param)))
