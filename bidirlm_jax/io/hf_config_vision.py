"""transformers' Qwen3-VL `config.json` → `Qwen3VLConfig` (text via `io.hf_config`, the tower's `vision_config` here).

A field the file omits takes transformers' default (transformers writes only the fields that differ),
which `VisionConfig`'s defaults are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.hf_config import config_from_hf
from bidirlm_jax.models.towers.qwen3_vl.config import Qwen3VLConfig, VisionConfig

_ARCHITECTURE_FIELDS = tuple(f.name for f in dataclasses.fields(VisionConfig) if f.name != "rope_theta")
_TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


def vision_config_from_hf(d: Mapping[str, Any]) -> VisionConfig:
    """A `VisionConfig` from a `vision_config` dict."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"vision_config must be a JSON object, got {type(d).__name__}")
    kw: dict[str, Any] = {k: d[k] for k in _ARCHITECTURE_FIELDS if k in d}
    if "deepstack_visual_indexes" in kw:
        kw["deepstack_visual_indexes"] = tuple(int(i) for i in kw["deepstack_visual_indexes"])
    rope = d.get("rope_parameters") or {}
    if rope.get("rope_type", "axial") != "axial":
        raise ConfigError(f"the Qwen3-VL vision tower rotates with axial RoPE, not {rope.get('rope_type')!r}")
    if "rope_theta" in rope:
        kw["rope_theta"] = float(rope["rope_theta"])
    for name in ("patch_size", "temporal_patch_size"):
        if not isinstance(kw.get(name, 0), int):
            raise ConfigError(f"vision_config.{name} must be one integer (square patches), got {kw[name]!r}")
    return VisionConfig(**kw)


def qwen3_vl_config_from_hf(d: Mapping[str, Any], **overrides: Any) -> Qwen3VLConfig:
    """A `Qwen3VLConfig` from a Qwen3-VL config.json dict; `overrides` are the text config's (`config_from_hf`).
    How it runs is `io.hf_config.runtime_from_hf(d)` (the attention mode the text config records)."""
    if not isinstance(d, Mapping) or d.get("model_type") != "qwen3_vl":
        got = d.get("model_type") if isinstance(d, Mapping) else type(d).__name__
        raise ConfigError(f"expected a Qwen3-VL config (model_type 'qwen3_vl'), got {got!r}")
    tokens = {k: int(d[k]) for k in _TOKEN_FIELDS if k in d}
    text = config_from_hf(d, **overrides)
    return Qwen3VLConfig(text=text, vision=vision_config_from_hf(d.get("vision_config") or {}), **tokens)
