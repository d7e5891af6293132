"""`bidirlm train --config configs/lm.py:PRESET`: the causal-LM config, kept in `bidirlm_jax/configs/lm.py`."""

from bidirlm_jax.configs.lm import get_config

__all__ = ["get_config"]
