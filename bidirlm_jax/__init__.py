"""bidirlm-jax: turn causal LLMs (Gemma3, Qwen3) into bidirectional encoders, in JAX/Flax.

The public API, of which the `bidirlm` command is a thin shell. Names are imported on first use, so
`import bidirlm_jax` (and every CLI command) pays only for the modules it touches.
"""

from __future__ import annotations

import importlib
from typing import Any

from bidirlm_jax.errors import BidirLMError, CheckpointError, ConfigError

_EXPORTS = {
    "from_pretrained": "bidirlm_jax.io.hf",
    "save_pretrained": "bidirlm_jax.io.hf",
    "convert": "bidirlm_jax.io.conversion",
    "ModelConfig": "bidirlm_jax.models.config",
    "param_count": "bidirlm_jax.io.params",
    "contrastive_loss": "bidirlm_jax.losses.infonce",
    "encode": "bidirlm_jax.embed.encode",
    "media_processor": "bidirlm_jax.data.media.items",
    "export_encoder": "bidirlm_jax.io.sentence_transformers",
    "export_omni": "bidirlm_jax.io.omni_export",
    "evaluate_retrieval": "bidirlm_jax.evals.retrieval",
    "PRESETS": "bidirlm_jax.models.presets",
    "get_preset": "bidirlm_jax.models.presets",
    "ModelOutput": "bidirlm_jax.models.transformer",
    "Transformer": "bidirlm_jax.models.transformer",
    "interpolate": "bidirlm_jax.merge.linear",
    "linear_merge": "bidirlm_jax.merge.linear",
    "merge_checkpoints": "bidirlm_jax.merge.stream",
    "enable_compilation_cache": "bidirlm_jax.compilation_cache",
}

__all__ = ["BidirLMError", "CheckpointError", "ConfigError", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bidirlm_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
