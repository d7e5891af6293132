"""`bidirlm ablate --config configs/ablation.py:PRESET`: the ablation config, kept in `bidirlm_jax/configs/ablation.py`."""

from bidirlm_jax.configs.ablation import get_config

__all__ = ["get_config"]
