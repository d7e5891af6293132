"""`bidirlm train --config configs/finetune.py:PRESET`: the fine-tuning config, kept in `bidirlm_jax/configs/finetune.py`."""

from bidirlm_jax.configs.finetune import get_config

__all__ = ["get_config"]
