"""A checkpoint's `audio_config` → `AudioConfig`: Qwen3-ASR (transformers' -hf and the original
`thinker_config`), Qwen3-Omni's audio encoder and BidirLM-Omni's `audio_tower`.

`n_window`/`n_window_infer` are read, never defaulted: they differ between sources (Qwen3-ASR 50/800,
BidirLM-Omni's remote defaults 100/400) and set the token count. The attention mode follows what
runs each checkpoint: BidirLM-Omni's remote code attends over whole clips ("clip"), transformers'
encoders within windows ("window"); an explicit `audio_attention` wins.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.hf_config import config_from_hf, config_to_hf
from bidirlm_jax.models.runtime import DEFAULT_RUNTIME, Runtime
from bidirlm_jax.models.towers.qwen3_asr.config import AudioConfig, Qwen3ASRConfig

REQUIRED = (
    "d_model",
    "encoder_layers",
    "encoder_attention_heads",
    "encoder_ffn_dim",
    "output_dim",
    "n_window",
    "n_window_infer",
)
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


def audio_config_from_hf(d: Mapping[str, Any], *, audio_attention: str | None = None) -> AudioConfig:
    """Read the audio tower's config from a whole config.json or its `audio_config` (how it runs is a
    `Runtime`, given to the encoder)."""
    audio = find_audio_config(d)
    missing = [k for k in REQUIRED if k not in audio]
    if missing:
        raise ConfigError(f"audio_config lacks {', '.join(missing)}; the checkpoint's config.json must state them")
    fields = {k: audio[k] for k in REQUIRED + OPTIONAL if k in audio}
    if audio_attention is None:
        audio_attention = "clip" if audio.get("model_type") in CLIP_ATTENTION_TYPES else "window"
    return AudioConfig(**fields, audio_attention=audio_attention)


# Top-level fields of a Qwen3-ASR config.json that `Qwen3ASRConfig` itself reads or writes.
_ASR_OWN = (
    "model_type",
    "architectures",
    "audio_config",
    "text_config",
    "thinker_config",
    "audio_token_id",
    "tie_word_embeddings",
    "dtype",
    "torch_dtype",
    "transformers_version",
)
ASR_AUDIO_TOKEN_ID = 151676  # transformers' `Qwen3ASRConfig` default: Qwen3-ASR's `<|audio_pad|>`


def is_qwen3_asr(d: Mapping[str, Any]) -> bool:
    """Whether a config.json describes a Qwen3-ASR model (transformers' -hf or the original `thinker_config`)."""
    return isinstance(d, Mapping) and d.get("model_type") == "qwen3_asr"


def qwen3_asr_config_from_hf(d: Mapping[str, Any], **overrides: Any) -> Qwen3ASRConfig:
    """A `Qwen3ASRConfig` from a Qwen3-ASR config.json dict; `overrides` are the text config's (`config_from_hf`).
    How it runs is `io.hf_config.runtime_from_hf(d)` (the attention mode the text config records)."""
    if not is_qwen3_asr(d):
        got = d.get("model_type") if isinstance(d, Mapping) else type(d).__name__
        raise ConfigError(f"expected a Qwen3-ASR config (model_type 'qwen3_asr'), got {got!r}")
    holder = d.get("thinker_config") or d
    # the original layout's own fields (its thinker's) are not transformers': carry only the -hf ones
    extra = (
        () if "thinker_config" in d else tuple(sorted((k, json.dumps(v)) for k, v in d.items() if k not in _ASR_OWN))
    )
    return Qwen3ASRConfig(
        text=config_from_hf(d, **overrides),
        audio=audio_config_from_hf(d),
        audio_token_id=int(holder.get("audio_token_id", ASR_AUDIO_TOKEN_ID)),
        extra=extra,
    )


def qwen3_asr_config_to_hf(
    config: Qwen3ASRConfig, runtime: Runtime = DEFAULT_RUNTIME, *, dtype: str | None = None
) -> dict[str, Any]:
    """A config.json that transformers loads as `Qwen3ASRForConditionalGeneration` (its -hf layout), in the
    runtime's attention mode."""
    text = config_to_hf(config.text, runtime, dtype=dtype)
    text.pop("architectures", None)
    audio = config.audio
    audio_fields = {k: getattr(audio, k) for k in REQUIRED + OPTIONAL}
    d: dict[str, Any] = {k: json.loads(v) for k, v in config.extra}
    d.update(
        model_type="qwen3_asr",
        architectures=["Qwen3ASRForConditionalGeneration"],
        audio_config=dict(audio_fields, model_type="qwen3_asr_encoder", max_position_embeddings=audio.chunk_tokens),
        text_config=text,
        audio_token_id=config.audio_token_id,
        tie_word_embeddings=config.text.tie_word_embeddings,
    )
    if dtype is not None:
        d["dtype"] = dtype
    return d
