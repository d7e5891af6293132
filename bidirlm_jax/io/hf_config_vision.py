"""transformers' Qwen3-VL `config.json` <-> `Qwen3VLConfig` (text via `io.hf_config`, the tower's `vision_config` here).

A field the file omits takes transformers' default (transformers writes only the fields that differ),
which `VisionConfig`'s defaults are. Fields no model reads are carried through `Qwen3VLConfig.extra`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.hf_config import TENSOR_DTYPES_KEY, config_from_hf, config_to_hf
from bidirlm_jax.models.runtime import DEFAULT_RUNTIME, Runtime
from bidirlm_jax.models.towers.qwen3_vl.config import Qwen3VLConfig, VisionConfig

_ARCHITECTURE_FIELDS = tuple(f.name for f in dataclasses.fields(VisionConfig) if f.name != "rope_theta")
_TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
# Written afresh by every export (the dtypes, the flag read into the text config), never carried.
_TOP_LEVEL = (
    *("model_type", "architectures", "text_config", "vision_config", "tie_word_embeddings"),
    *("dtype", "torch_dtype", "transformers_version", TENSOR_DTYPES_KEY, *_TOKEN_FIELDS),
)
VISION_READ = (*_ARCHITECTURE_FIELDS, "rope_parameters", "model_type")
ARCHITECTURE = "Qwen3VLForConditionalGeneration"  # what io.layouts.QWEN3_VL lays out


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
    vision = d.get("vision_config") or {}
    text = config_from_hf(d, **overrides)
    extra = {k: v for k, v in d.items() if k not in _TOP_LEVEL}
    vision_extra = {k: v for k, v in vision.items() if k not in VISION_READ} if isinstance(vision, Mapping) else {}
    if vision_extra:
        extra["vision_config"] = vision_extra
    carried = tuple(sorted((k, json.dumps(v)) for k, v in extra.items()))
    return Qwen3VLConfig(text=text, vision=vision_config_from_hf(vision), **tokens, extra=carried)


def vision_config_to_hf(v: VisionConfig, carried: Mapping[str, Any]) -> dict[str, Any]:
    """A `vision_config` dict: the `carried` fields no model reads, then every architecture field."""
    return {
        **carried,
        **{k: getattr(v, k) for k in _ARCHITECTURE_FIELDS},
        "deepstack_visual_indexes": list(v.deepstack_visual_indexes),
        "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
        "model_type": "qwen3_vl_vision",
    }


def qwen3_vl_config_to_hf(
    config: Qwen3VLConfig, runtime: Runtime = DEFAULT_RUNTIME, *, dtype: str | None = None
) -> dict[str, Any]:
    """A config.json transformers loads as its own Qwen3-VL classes, in the runtime's attention mode
    (`is_causal: false` in `text_config` when bidirectional) and with the LM head's tying at the top, where
    transformers 5 reads it (and in `text_config`, where 4.x did)."""
    d: dict[str, Any] = {k: json.loads(v) for k, v in config.extra}
    text = config_to_hf(config.text, runtime)
    del text["architectures"]
    text["model_type"] = "qwen3_vl_text"
    vision = vision_config_to_hf(config.vision, d.pop("vision_config", {}))
    d.update(
        model_type="qwen3_vl",
        architectures=[ARCHITECTURE],
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=text["tie_word_embeddings"],
        **{k: getattr(config, k) for k in _TOKEN_FIELDS},
    )
    if dtype is not None:
        d["dtype"] = dtype
    return d
