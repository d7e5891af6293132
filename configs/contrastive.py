"""`bidirlm train --config configs/contrastive.py:PRESET`: kept in `bidirlm_jax/configs/contrastive.py`."""

from bidirlm_jax.configs.contrastive import get_config

__all__ = ["get_config"]
