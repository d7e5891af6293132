"""Edits of transformers `config.json` dictionaries that must not lose the fields we do not model."""

from __future__ import annotations

import copy
from typing import Any

from bidirlm_jax.models.config import MULTIMODAL_MODEL_TYPES, ModelConfig

# The keys through which transformers decides causal vs bidirectional attention and window width.
ATTENTION_KEYS = ("use_bidirectional_attention", "is_causal", "sliding_window", "use_sliding_window")


def set_attention_mode(hf_config: dict[str, Any], attention: str, bidirectional_window: str | None = None) -> dict[str, Any]:
    """A copy of `hf_config` (text or multimodal) whose text model runs in the given attention mode.

    Everything but the attention keys is kept as it was, so a Qwen3-VL or Gemma3 multimodal config
    stays loadable as what it is.
    """
    d = copy.deepcopy(hf_config)
    target = d.get("text_config") if d.get("model_type") in MULTIMODAL_MODEL_TYPES else d
    config = ModelConfig.from_hf_dict(d)
    config = config.replace(attention=attention, bidirectional_window=bidirectional_window or config.bidirectional_window)
    rendered = config.to_hf_dict()
    target.pop("is_causal", None)  # rendered only when bidirectional
    target.update({key: rendered[key] for key in ATTENTION_KEYS if key in rendered})
    return d
