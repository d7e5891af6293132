"""`bidirlm_jax.param_count` on a checkpoint: the model package counts a state, this side reads config.json."""

from __future__ import annotations

import os
from typing import Any

from bidirlm_jax.io.hf_config import read_config_dict
from bidirlm_jax.io.model_types import described_type, model_type_of
from bidirlm_jax.models import params
from bidirlm_jax.models.config import ModelConfig
from bidirlm_jax.models.runtime import DEFAULT_RUNTIME
from bidirlm_jax.paths import user_path


def param_count(path_or_config: str | os.PathLike | ModelConfig | Any) -> int:
    """Parameters of the model a config (or a config.json / a directory holding one) describes, a tower
    model's tower included; tied weights once."""
    if isinstance(path_or_config, (str, os.PathLike)):
        d = read_config_dict(user_path(path_or_config))
        path_or_config = described_type(d).read(d)
    return params.count(model_type_of(path_or_config).abstract(path_or_config, DEFAULT_RUNTIME)[1])
