"""BidirLM-Omni's released `config.json` (`model_type: bidirlm_omni`) <-> `OmniConfig`.

The released remote code (`configuration_bidirlm_omni.py`) names three sub-configs, `text_config`
(`bidirlm_omni_text`: Qwen3 fields, legacy `rope_theta` + `rope_scaling.mrope_section`), `vision_config`
(Qwen3-VL's tower) and `audio_config` (the AuT tower, projector inside), plus the special token ids at the
top. transformers writes only the fields that differ from a config class's defaults, so a field the file
omits means the remote class's default: those defaults are listed here (they are not our other readers'
defaults: the remote text config rotates at θ 5e6, its audio config windows at n_window 100/400). The
remote model always attends bidirectionally in the text stack and over whole clips in the audio tower.

An export names the released remote code in `auto_map` (no code file is written: loading it needs the hub).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.hf_config import config_from_hf, config_to_hf
from bidirlm_jax.io.hf_config_audio import OPTIONAL, REQUIRED, audio_config_from_hf
from bidirlm_jax.io.hf_config_vision import VISION_READ, vision_config_from_hf, vision_config_to_hf
from bidirlm_jax.models.runtime import DEFAULT_RUNTIME, Runtime
from bidirlm_jax.models.towers.omni.config import OmniConfig

MODEL_TYPE = "bidirlm_omni"
RELEASE_REPO = "BidirLM/BidirLM-Omni-2.5B-Embedding"  # where the remote code lives
AUTO_MAP = {
    "AutoConfig": f"{RELEASE_REPO}--configuration_bidirlm_omni.BidirLMOmniConfig",
    "AutoModel": f"{RELEASE_REPO}--modeling_bidirlm_omni.BidirLMOmniModel",
    "AutoModelForMaskedLM": f"{RELEASE_REPO}--modeling_bidirlm_omni.BidirLMOmniForMaskedLM",
}
ARCHITECTURE = "BidirLMOmniModel"
# The remote audio config class's defaults, which a config.json omits (transformers writes differences only;
# the text config's are `io.families.MULTIMODAL_TEXT_DEFAULTS`).
AUDIO_DEFAULTS = dict(
    num_mel_bins=128,
    encoder_layers=32,
    encoder_attention_heads=20,
    encoder_ffn_dim=5120,
    d_model=1280,
    activation_function="gelu",
    n_window=100,
    output_dim=3584,
    n_window_infer=400,
    downsample_hidden_size=480,
)
AUDIO_CARRIED = dict(max_source_positions=1500, conv_chunksize=500)  # fields only the remote code reads
TOKEN_FIELDS = (
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
    "audio_token_id",
    "audio_start_token_id",
    "audio_end_token_id",
)
_SUB_CONFIGS = ("text_config", "vision_config", "audio_config")
_WRITTEN = (
    *("model_type", "architectures", "auto_map", "tie_word_embeddings", "dtype", "torch_dtype"),
    *("transformers_version", *_SUB_CONFIGS, *TOKEN_FIELDS),
)


def is_omni(d: Mapping[str, Any]) -> bool:
    return isinstance(d, Mapping) and d.get("model_type") == MODEL_TYPE


def omni_config_from_hf(d: Mapping[str, Any], **overrides: Any) -> OmniConfig:
    """An `OmniConfig` from a bidirlm_omni config.json; `overrides` are the text config's (`config_from_hf`).
    A sub-config the file lacks (an export of a model built without that tower) is an absent tower."""
    if not is_omni(d):
        got = d.get("model_type") if isinstance(d, Mapping) else type(d).__name__
        raise ConfigError(f"expected a BidirLM-Omni config (model_type {MODEL_TYPE!r}), got {got!r}")
    vision, audio = d.get("vision_config"), d.get("audio_config")
    for name, sub in (("vision_config", vision), ("audio_config", audio)):
        if sub is not None and not isinstance(sub, Mapping):
            raise ConfigError(f"{name} must be a JSON object, got {type(sub).__name__}")
    audio_config = None
    if audio is not None:
        audio_config = audio_config_from_hf({"audio_config": {**AUDIO_DEFAULTS, **audio}}, audio_attention="clip")
    extra = {k: v for k, v in d.items() if k not in _WRITTEN}
    for name, sub, read in (
        ("vision_config", vision, VISION_READ),
        ("audio_config", audio, (*REQUIRED, *OPTIONAL, "model_type")),
    ):
        own = {k: v for k, v in (sub or {}).items() if k not in read}
        if own:
            extra[name] = own
    return OmniConfig(
        text=config_from_hf(d, **{"tie_word_embeddings": True, **overrides}),  # the remote model has no own head
        vision=None if vision is None else vision_config_from_hf(vision),
        audio=audio_config,
        **{k: int(d[k]) for k in TOKEN_FIELDS if k in d},
        extra=tuple(sorted((k, json.dumps(v)) for k, v in extra.items())),
    )


def omni_config_to_hf(
    config: OmniConfig, runtime: Runtime = DEFAULT_RUNTIME, *, dtype: str | None = None
) -> dict[str, Any]:
    """A bidirlm_omni config.json the released remote code loads (`auto_map` names it on the hub): every
    field written, so no remote default decides anything."""
    if runtime.attention != "bidirectional":
        raise ConfigError("a BidirLM-Omni export is bidirectional (its remote code knows no causal mode)")
    d: dict[str, Any] = {k: json.loads(v) for k, v in config.extra}
    text = config_to_hf(config.text, runtime)
    del text["architectures"]
    section = list(config.text.mrope_section)
    text.update(
        model_type="bidirlm_omni_text",
        rope_theta=config.text.rope_full.theta,
        rope_scaling={"rope_type": "default", "mrope_section": section, "mrope_interleaved": True},
        tie_word_embeddings=True,
    )
    d.update(model_type=MODEL_TYPE, architectures=[ARCHITECTURE], auto_map=dict(AUTO_MAP), text_config=text)
    if config.vision is not None:
        vision = vision_config_to_hf(config.vision, d.pop("vision_config", {}))
        d["vision_config"] = dict(vision, model_type="bidirlm_omni_vision")
    if config.audio is not None:
        audio = {**AUDIO_CARRIED, **d.pop("audio_config", {})}
        audio.update({k: getattr(config.audio, k) for k in REQUIRED + OPTIONAL}, model_type="bidirlm_omni_audio")
        d["audio_config"] = audio
    d.update({k: getattr(config, k) for k in TOKEN_FIELDS}, tie_word_embeddings=True)
    if dtype is not None:
        d["dtype"] = dtype
    return d
