"""`bidirlm train --config configs/mntp.py:PRESET`: the MNTP config, kept in `bidirlm_jax/configs/mntp.py`."""

from bidirlm_jax.configs.mntp import get_config

__all__ = ["get_config"]
