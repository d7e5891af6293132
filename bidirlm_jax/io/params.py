"""`bidirlm_jax.param_count` on a checkpoint: the model package counts a config, this side reads config.json."""

from __future__ import annotations

import os

from bidirlm_jax.io.hf_config import read_config
from bidirlm_jax.models import params
from bidirlm_jax.models.config import ModelConfig
from bidirlm_jax.paths import user_path


def param_count(path_or_config: str | os.PathLike | ModelConfig) -> int:
    """Parameters of the model a config (or a config.json / a directory holding one) describes; tied weights once."""
    config = path_or_config if isinstance(path_or_config, ModelConfig) else read_config(user_path(path_or_config))
    return params.param_count(config)
