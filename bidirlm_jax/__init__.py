"""bidirlm-jax: turn causal LLMs (Gemma3, Qwen3) into bidirectional encoders, in JAX/Flax.

The public API; each function is also a `bidirlm` CLI command.
"""

from bidirlm_jax.errors import BidirLMError, CheckpointError, ConfigError
from bidirlm_jax.io.hf import from_pretrained, save_pretrained
from bidirlm_jax.models.config import ModelConfig
from bidirlm_jax.models.params import param_count
from bidirlm_jax.models.presets import PRESETS, get_preset
from bidirlm_jax.models.transformer import ModelOutput, Transformer

__all__ = [
    "BidirLMError", "CheckpointError", "ConfigError", "ModelConfig", "ModelOutput", "PRESETS", "Transformer",
    "from_pretrained", "get_preset", "param_count", "save_pretrained",
]  # fmt: skip
