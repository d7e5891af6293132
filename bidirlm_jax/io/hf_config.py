"""transformers' `config.json` <-> `ModelConfig`: the model knows no file format, this module does.

It maps a family (the tables of `io.families`: model types, feature flags) to its field names in
config.json, so a third family is entries there and here, not a branch in the model.

Reads legacy (`rope_theta`, `rope_scaling`, `sliding_window_pattern`) and transformers-5
(`rope_parameters`) fields, multimodal configs (their `text_config`), and the flags through which
transformers decides causal vs bidirectional attention; writes both generations of fields, so
transformers 4.x reads an export as 5.x does. Edits of whole dictionaries (`set_attention_mode`) keep
every field we do not model.

A bidirectional export must tell transformers a window it applies as is (W//2 for Qwen3 "half",
a window past every position for "none"), which loses the declared window. It is kept in
`bidirlm_sliding_window` and the mode in `bidirlm_bidirectional_window`: transformers carries unknown
fields along (through its own save too) and ignores them, and this reader prefers them, so loading an
export back as causal gives the original model.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io import families, released
from bidirlm_jax.io.families import (
    ARCHITECTURES,
    EXPORT_MODEL_TYPES,
    FAMILY_FLAGS,
    MROPE_DEFAULTS,
    MULTIMODAL_MODEL_TYPES,
    MULTIMODAL_TEXT_TYPES,
    SUPPORTED_MODEL_TYPES,
    TEXT_MODEL_TYPES,
)
from bidirlm_jax.models.config import FULL, SLIDING, ModelConfig, Rope
from bidirlm_jax.models.runtime import DEFAULT_RUNTIME, Runtime

_OLDER_PLUS_ONE_NORMS = ("gemma", "gemma2")  # model types we do not load whose norms are (1 + w) as well
_GEMMA3 = "gemma3"  # the family whose config.json spells its fields Gemma's way
# Our own fields: the declared window and the bidirectional window mode of an export (see above).
WINDOW_KEY = "bidirlm_sliding_window"
WINDOW_MODE_KEY = "bidirlm_bidirectional_window"
# A checkpoint's record of the dtypes its source stored, for tensors not in its `dtype` (see io.checkpoint).
TENSOR_DTYPES_KEY = "bidirlm_tensor_dtypes"
# The keys through which transformers (and we) decide causal vs bidirectional attention and window width.
ATTENTION_KEYS = (
    "use_bidirectional_attention",
    "is_causal",
    "sliding_window",
    "use_sliding_window",
    WINDOW_KEY,
    WINDOW_MODE_KEY,
)
# Source fields that make transformers import code files, which our exports do not carry.
REMOTE_CODE_KEYS = ("auto_map", "custom_pipelines")

log = logging.getLogger(__name__)


def _text_part(d: Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    """The text model's config (a multimodal config's `text_config`) and its family."""
    d = released.as_native(d)  # BidirLM's released text checkpoints: the native config of the same model
    if not isinstance(d, Mapping):
        raise ConfigError(f"config.json must hold a JSON object, got {type(d).__name__}")
    model_type = d.get("model_type")
    if model_type in MULTIMODAL_MODEL_TYPES:
        text = {**families.MULTIMODAL_TEXT_DEFAULTS.get(model_type, {}), **(_text_holder(d).get("text_config") or {})}
        text.setdefault("model_type", MULTIMODAL_TEXT_TYPES[model_type])
        if model_type == "qwen3_asr":  # Qwen3 whatever the original names it
            text["model_type"] = "qwen3"
        if "tie_word_embeddings" in d:  # the LM head belongs to the whole model: its flag rules (transformers 5)
            text["tie_word_embeddings"] = d["tie_word_embeddings"]
        return _text_part(text)
    if model_type not in TEXT_MODEL_TYPES:
        raise ConfigError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return d, TEXT_MODEL_TYPES[model_type]


def config_from_hf(d: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """Read a transformers config's architecture (legacy `rope_theta`/`rope_scaling` fields or v5 `rope_parameters`)."""
    text, family = _text_part(d)
    model_type = text["model_type"]
    try:
        fields = _gemma3_fields(text) if family == _GEMMA3 else _qwen3_fields(text)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise ConfigError(f"config.json for {model_type} is malformed: {e!r}") from e
    if d.get("model_type") == "qwen3_asr":  # its M-RoPE rows are all equal (audio takes text positions): plain RoPE
        fields["mrope_section"] = None
    known = _CONSUMED_KEYS | {"model_type"}
    extra = tuple(sorted((k, json.dumps(v)) for k, v in text.items() if k not in known))
    return ModelConfig(family=family, extra=extra, **{**FAMILY_FLAGS[family], **fields, **overrides})


def _text_holder(d: Mapping[str, Any]) -> Mapping[str, Any]:
    """Where a multimodal config keeps its `text_config`: the original Qwen3-ASR nests it under `thinker_config`."""
    return d.get("thinker_config") or d


def runtime_from_hf(d: Mapping[str, Any], **settings: Any) -> Runtime:
    """The run settings a transformers config records (its attention mode and window mode), `settings` on top."""
    d, family = _text_part(d)
    return Runtime(**{**_attention_fields(d, gemma=family == _GEMMA3), **settings})


def config_to_hf(
    config: ModelConfig, runtime: Runtime = DEFAULT_RUNTIME, *, dtype: str | None = None
) -> dict[str, Any]:
    """A config.json that transformers loads natively (no remote code), in the runtime's attention mode
    (the one run setting an export records)."""
    if config.family not in ARCHITECTURES:
        raise ConfigError(
            f"family {config.family!r} has no transformers format to export to (known: {', '.join(ARCHITECTURES)}); "
            "give the config one of those families, or add the family to io/families.py"
        )
    d: dict[str, Any] = {k: json.loads(v) for k, v in config.extra}
    remote = sorted(k for k, v in d.items() if k in REMOTE_CODE_KEYS or _names_code_file(v))
    if remote:
        log.warning("dropping remote-code fields %s of the source config.json: the export carries no code", remote)
        for key in remote:
            del d[key]
    d.update(
        model_type=EXPORT_MODEL_TYPES[config.family],
        architectures=[ARCHITECTURES[config.family]],
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=config.attention_bias,
        max_position_embeddings=config.max_position_embeddings,
        layer_types=list(config.layer_types),
        bos_token_id=config.bos_token_id,
        eos_token_id=list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    if dtype is not None:
        d["dtype"] = dtype
    window = config.sliding_window
    rope_sliding = config.rope_sliding or config.rope_full
    # transformers 5 reads `rope_parameters`; 4.x the legacy fields beside it (5 reads them identically).
    d.update(rope_theta=config.rope_full.theta, rope_scaling=_legacy_scaling(config.rope_full))
    gemma = config.family == _GEMMA3
    if gemma:
        d.update(
            hidden_activation=config.activation,
            query_pre_attn_scalar=config.query_pre_attn_scalar,
            attn_logit_softcapping=config.attn_logit_softcapping,
            final_logit_softcapping=config.final_logit_softcapping,
            rope_parameters={FULL: _rope_dict(config.rope_full), SLIDING: _rope_dict(rope_sliding)},
            rope_local_base_freq=rope_sliding.theta,
            use_bidirectional_attention=False,
        )
        pattern = _periodic_pattern(config.layer_types)
        if pattern is not None:
            d["sliding_window_pattern"] = pattern
    else:
        d.update(hidden_act=config.activation, rope_parameters=_rope_dict(config.rope_full, config.mrope_section))
        full_layers = config.layer_types.index(SLIDING) if SLIDING in config.layer_types else None
        if full_layers is not None and set(config.layer_types[full_layers:]) == {SLIDING}:
            d["max_window_layers"] = full_layers
    if runtime.attention == "bidirectional":
        d[WINDOW_KEY] = window
        d[WINDOW_MODE_KEY] = runtime.bidirectional_window
        if gemma and runtime.bidirectional_window == "half":
            d["use_bidirectional_attention"] = True  # transformers halves the declared window itself
        else:
            d["is_causal"] = False  # generic route: sliding layers see |i-j| <= W
            if window is not None and runtime.bidirectional_window == "half":
                window //= 2  # |i-j| <= W//2 expressed through the generic inclusive window
            elif window is not None and runtime.bidirectional_window == "none":
                window = max(config.max_position_embeddings, window)
    d["sliding_window"] = window
    if not gemma:
        d["use_sliding_window"] = window is not None and SLIDING in config.layer_types
    return d


def norm_plus_one(d: Mapping[str, Any]) -> bool:
    """Whether a config.json's model applies RMSNorm as (1 + w) (for tensor-level tools that build no model;
    Gemma 1 and 2 do too, and raw merges may meet them)."""
    d = released.as_native(d)
    model_type = d.get("model_type")
    family = TEXT_MODEL_TYPES.get(model_type) or MULTIMODAL_MODEL_TYPES.get(model_type)
    return model_type in _OLDER_PLUS_ONE_NORMS or bool(FAMILY_FLAGS.get(family, {}).get("norm_plus_one"))


def read_config(path: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """The `ModelConfig` of a directory's (or a file's) config.json; `overrides` replace single fields."""
    return config_from_hf(read_config_dict(path), **overrides)


def read_runtime(path: str | os.PathLike, **settings: Any) -> Runtime:
    """The run settings a directory's (or a file's) config.json records, `settings` on top."""
    return runtime_from_hf(read_config_dict(path), **settings)


def read_config_dict(path: str | os.PathLike) -> dict[str, Any]:
    """A directory's (or a file's) config.json as it is."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json at {path}; point to a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e


def set_attention_mode(
    hf_config: dict[str, Any], attention: str, bidirectional_window: str | None = None
) -> dict[str, Any]:
    """A copy of `hf_config` (text, multimodal or BidirLM's) whose text model runs in the given attention mode; every
    other key is kept, so a Qwen3-VL, Gemma3 multimodal or BidirLM config stays loadable as what it is."""
    released.check_attention(hf_config, attention, bidirectional_window)
    d = copy.deepcopy(hf_config)
    target = _text_holder(d).get("text_config") or d  # a multimodal (or nested BidirLM) config's text model
    window = {"bidirectional_window": bidirectional_window} if bidirectional_window else {}
    rendered = config_to_hf(config_from_hf(d), runtime_from_hf(d, attention=attention, **window))
    for key in ATTENTION_KEYS:  # some are rendered only when bidirectional: drop stale ones
        if key in rendered:
            target[key] = rendered[key]
        else:
            target.pop(key, None)
    return d


_CONSUMED_KEYS = {
    "architectures",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "layer_types",
    "rope_parameters",
    "rope_theta",
    "rope_local_base_freq",
    "rope_scaling",
    "sliding_window",
    "sliding_window_pattern",
    "_sliding_window_pattern",
    "use_sliding_window",
    "max_window_layers",
    "query_pre_attn_scalar",
    "rms_norm_eps",
    "hidden_activation",
    "hidden_act",
    "tie_word_embeddings",
    "attention_bias",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "max_position_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "use_bidirectional_attention",
    "is_causal",
    WINDOW_KEY,
    WINDOW_MODE_KEY,
    TENSOR_DTYPES_KEY,
    "dtype",
    "torch_dtype",
    "transformers_version",
}


def _rope_dict(rope: Rope, mrope_section: tuple[int, ...] | None = None) -> dict[str, Any]:
    d = {"rope_type": "default", "rope_theta": rope.theta}
    if rope.factor != 1.0:
        d = {"rope_type": "linear", "factor": rope.factor, "rope_theta": rope.theta}
    if mrope_section is not None:  # Qwen3-VL always interleaves; the flag tells readers that expect it
        d.update(mrope_section=list(mrope_section), mrope_interleaved=True)
    return d


def _legacy_scaling(rope: Rope) -> dict[str, Any] | None:
    return None if rope.factor == 1.0 else {"rope_type": "linear", "factor": rope.factor}


def _periodic_pattern(layer_types: tuple[str, ...]) -> int | None:
    """Gemma3's legacy `sliding_window_pattern`: every p-th layer global, if the layers follow one."""
    for p in range(1, len(layer_types) + 2):
        if all((SLIDING if (i + 1) % p else FULL) == t for i, t in enumerate(layer_types)):
            return p
    return None


def _names_code_file(value: Any) -> bool:
    """Whether a config value names a Python file (a remote-code reference)."""
    if isinstance(value, str):
        return value.endswith(".py")
    if isinstance(value, Mapping):
        return any(_names_code_file(v) for v in value.values())
    if isinstance(value, list):
        return any(_names_code_file(v) for v in value)
    return False


def _parse_rope(params: Mapping[str, Any] | None, theta: float) -> Rope:
    """Rope from a transformers rope dict; only the types these families publish are accepted."""
    params = dict(params or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", theta))
    if rope_type == "default":
        return Rope(theta)
    if rope_type == "linear":
        return Rope(theta, float(params["factor"]))
    raise ConfigError(f"rope_type {rope_type!r} is not supported (supported: default, linear)")


def _attention_fields(d: Mapping[str, Any], *, gemma: bool) -> dict[str, Any]:
    """Attention mode and window mode; our own field names the window mode of our exports."""
    if gemma and d.get("use_bidirectional_attention"):
        window = "half"
    elif d.get("is_causal") is False:
        window = "full"
    else:
        return {"attention": "causal"}
    return {"attention": "bidirectional", "bidirectional_window": d.get(WINDOW_MODE_KEY, window)}


def _common_fields(d: Mapping[str, Any], *, head_dim_default: int) -> dict[str, Any]:
    heads = d["num_attention_heads"]
    eos = d.get("eos_token_id")
    return dict(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or head_dim_default,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        attention_bias=bool(d.get("attention_bias", False)),
        max_position_embeddings=d.get("max_position_embeddings", 32768),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=d.get("pad_token_id"),
    )


def _gemma3_fields(d: Mapping[str, Any]) -> dict[str, Any]:
    fields = _common_fields(d, head_dim_default=256)
    n = fields["num_layers"]
    pattern = d.get("sliding_window_pattern", d.get("_sliding_window_pattern", 6))
    layer_types = d.get("layer_types") or [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
    params = d.get("rope_parameters") or {}
    if params and FULL not in params and SLIDING not in params:
        params = {FULL: params}  # a single, type-less rope dict applies to the global layers
    full = dict(params.get(FULL) or {})
    if d.get("rope_scaling"):
        full.update(d["rope_scaling"])
    return dict(
        fields,
        layer_types=tuple(layer_types),
        rope_full=_parse_rope(full, d.get("rope_theta", 1_000_000.0)),
        rope_sliding=_parse_rope(params.get(SLIDING), d.get("rope_local_base_freq", 10_000.0)),
        sliding_window=d.get(WINDOW_KEY, d.get("sliding_window", 4096)),
        query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256),
        activation=d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh",
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        attn_logit_softcapping=d.get("attn_logit_softcapping"),
        final_logit_softcapping=d.get("final_logit_softcapping"),
    )


def _qwen3_fields(d: Mapping[str, Any]) -> dict[str, Any]:
    fields = _common_fields(d, head_dim_default=128)
    n = fields["num_layers"]
    window = d.get("sliding_window") if d.get("use_sliding_window") else None  # as Qwen3Config.__post_init__
    window = d.get(WINDOW_KEY, window)
    max_window_layers = d.get("max_window_layers", 28)
    layer_types = d.get("layer_types") or [
        SLIDING if window is not None and i >= max_window_layers else FULL for i in range(n)
    ]
    params = d.get("rope_parameters") or d.get("rope_scaling")
    sections = [(d.get(k) or {}).get("mrope_section") for k in ("rope_parameters", "rope_scaling")]
    section = next((s for s in sections if s is not None), MROPE_DEFAULTS.get(d.get("model_type")))
    return dict(
        fields,
        layer_types=tuple(layer_types),
        rope_full=_parse_rope(params, d.get("rope_theta", 10_000.0)),
        mrope_section=None if section is None else tuple(int(s) for s in section),
        sliding_window=window if SLIDING in layer_types else None,
        activation=d.get("hidden_act", "silu"),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
    )
