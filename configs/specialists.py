"""`bidirlm ablate --config configs/specialists.py:PRESET`: the composition study's config, kept in `bidirlm_jax/configs/specialists.py`."""

from bidirlm_jax.configs.specialists import get_config

__all__ = ["get_config"]
