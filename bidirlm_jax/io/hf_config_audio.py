"""A checkpoint's `audio_config` → `AudioConfig`: Qwen3-ASR (transformers' -hf and the original
`thinker_config`), Qwen3-Omni's audio encoder and BidirLM-Omni's `audio_tower`.

`n_window`/`n_window_infer` are read, never defaulted: they differ between sources (Qwen3-ASR 50/800,
BidirLM-Omni's remote defaults 100/400) and set the token count. The attention mode follows what
runs each checkpoint: BidirLM-Omni's remote code attends over whole clips ("clip"), transformers'
encoders within windows ("window"); an explicit `audio_attention` wins.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models.towers.qwen3_asr.config import AudioConfig

REQUIRED = ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "output_dim", "n_window",
            "n_window_infer")  # fmt: skip
OPTIONAL = ("num_mel_bins", "downsample_hidden_size", "activation_function")  # the same default everywhere
CLIP_ATTENTION_TYPES = ("bidirlm_omni_audio",)  # audio configs whose model runs full-clip attention


def find_audio_config(d: Mapping[str, Any]) -> Mapping[str, Any]:
    """The audio encoder's fields in a config.json: its `audio_config` (top level or under
    `thinker_config`), or `d` itself when it is an audio encoder's config."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"config.json must hold a JSON object, got {type(d).__name__}")
    for holder in (d, d.get("thinker_config") or {}):
        if isinstance(holder.get("audio_config"), Mapping):
            return holder["audio_config"]
    if "d_model" in d and "encoder_layers" in d:
        return d
    raise ConfigError(
        f"no audio encoder in this config (model_type {d.get('model_type')!r}): expected an `audio_config` "
        "(Qwen3-ASR, BidirLM-Omni) — give an audio model's checkpoint"
    )


def audio_config_from_hf(d: Mapping[str, Any], *, audio_attention: str | None = None, **overrides: Any) -> AudioConfig:
    """Read the audio tower's config from a whole config.json or its `audio_config`; `overrides` set run
    settings (`dtype`, `scan_layers`, `attention_impl`, ...)."""
    audio = find_audio_config(d)
    missing = [k for k in REQUIRED if k not in audio]
    if missing:
        raise ConfigError(f"audio_config lacks {', '.join(missing)}; the checkpoint's config.json must state them")
    fields = {k: audio[k] for k in REQUIRED + OPTIONAL if k in audio}
    if audio_attention is None:
        audio_attention = "clip" if audio.get("model_type") in CLIP_ATTENTION_TYPES else "window"
    try:
        return AudioConfig(**fields, audio_attention=audio_attention, **overrides)
    except TypeError as e:
        raise ConfigError(f"unknown audio config setting: {e}") from e
