"""One config for every supported decoder, read from and written to transformers' `config.json`.

Gemma3 and Qwen3 differ only in details the config decides (`family`): Gemma3 normalises with
`(1 + w)`, adds post-attention and post-MLP norms, scales embeddings by √d, uses GELU-tanh, a
`query_pre_attn_scalar` attention scale, and alternates sliding and global layers with two RoPE bases.
The config is frozen and hashable because NNX keeps it in the model's static graph definition.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from bidirlm_jax.errors import ConfigError

FULL = "full_attention"
SLIDING = "sliding_attention"
ATTENTION_MODES = ("causal", "bidirectional")
BIDIRECTIONAL_WINDOWS = ("half", "full", "none")
REMAT_POLICIES = ("none", "full", "save_dots")

# model_type -> family; multimodal types contribute their `text_config`.
TEXT_MODEL_TYPES = {"gemma3_text": "gemma3", "qwen3": "qwen3", "qwen3_vl_text": "qwen3"}
MULTIMODAL_MODEL_TYPES = {"gemma3": "gemma3", "qwen3_vl": "qwen3"}
SUPPORTED_MODEL_TYPES = tuple(TEXT_MODEL_TYPES) + tuple(MULTIMODAL_MODEL_TYPES)
_ARCHITECTURES = {"gemma3": "Gemma3ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_EXPORT_MODEL_TYPES = {"gemma3": "gemma3_text", "qwen3": "qwen3"}


@dataclass(frozen=True)
class Rope:
    """Rotary embedding of one layer type: base frequency and linear position-interpolation factor."""

    theta: float
    factor: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    family: str  # "gemma3" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_types: tuple[str, ...]
    rope_full: Rope
    rope_sliding: Rope | None = None
    sliding_window: int | None = None  # declared W (never the halved value transformers keeps in memory)
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (default: head_dim)
    rms_norm_eps: float = 1e-6
    activation: str = "silu"
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    attn_logit_softcapping: float | None = None  # kept for export; transformers' Gemma3 never applies it
    final_logit_softcapping: float | None = None
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # How to run it; none of these changes a weight.
    attention: str = "causal"
    bidirectional_window: str = "half"
    dtype: str = "float32"  # compute dtype of activations
    param_dtype: str = "float32"
    remat: str = "none"
    attention_impl: str = "auto"  # "auto" | "xla" | "cudnn" | "blocked" | "reference"
    extra: tuple[tuple[str, str], ...] = field(default=(), compare=False)  # other config.json keys, JSON-encoded

    def __post_init__(self):
        checks = [
            (self.family in _ARCHITECTURES, f"family {self.family!r} is not one of {sorted(_ARCHITECTURES)}"),
            (self.attention in ATTENTION_MODES, f"attention {self.attention!r} is not one of {ATTENTION_MODES}"),
            (
                self.bidirectional_window in BIDIRECTIONAL_WINDOWS,
                f"bidirectional_window {self.bidirectional_window!r} is not one of {BIDIRECTIONAL_WINDOWS}",
            ),
            (self.remat in REMAT_POLICIES, f"remat {self.remat!r} is not one of {REMAT_POLICIES}"),
            (len(self.layer_types) == self.num_layers, f"{len(self.layer_types)} layer_types for {self.num_layers} layers"),
            (set(self.layer_types) <= {FULL, SLIDING}, f"unknown layer types {set(self.layer_types) - {FULL, SLIDING}}"),
            (self.num_heads % self.num_kv_heads == 0, f"{self.num_heads} heads not a multiple of {self.num_kv_heads} KV heads"),
            (
                SLIDING not in self.layer_types or (self.sliding_window or 0) > 0,
                "sliding layers need a positive sliding_window",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"invalid model config: {message}")

    # --- derived properties -------------------------------------------------------------------
    @property
    def is_gemma(self) -> bool:
        return self.family == "gemma3"

    @property
    def attention_scale(self) -> float:
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def rope_for(self, layer_type: str) -> Rope:
        return self.rope_sliding if layer_type == SLIDING and self.rope_sliding else self.rope_full

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # --- transformers config.json -------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], **overrides: Any) -> "ModelConfig":
        """Read a transformers config (legacy `rope_theta`/`rope_scaling` fields or v5 `rope_parameters`)."""
        model_type = d.get("model_type")
        if model_type in MULTIMODAL_MODEL_TYPES:
            text = dict(d.get("text_config") or {})
            text.setdefault("model_type", "gemma3_text" if MULTIMODAL_MODEL_TYPES[model_type] == "gemma3" else "qwen3")
            return cls.from_hf_dict(text, **overrides)
        if model_type not in TEXT_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        family = TEXT_MODEL_TYPES[model_type]
        try:
            fields = _gemma3_fields(d) if family == "gemma3" else _qwen3_fields(d)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"config.json for {model_type} is malformed: {e!r}") from e
        known = _CONSUMED_KEYS | {"model_type"}
        extra = tuple(sorted((k, json.dumps(v)) for k, v in d.items() if k not in known))
        return cls(family=family, extra=extra, **{**fields, **overrides})

    def to_hf_dict(self, *, dtype: str | None = None) -> dict[str, Any]:
        """A config.json that transformers loads natively (no remote code), in this config's attention mode."""
        d: dict[str, Any] = {k: json.loads(v) for k, v in self.extra}
        d.update(
            model_type=_EXPORT_MODEL_TYPES[self.family],
            architectures=[_ARCHITECTURES[self.family]],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            attention_bias=self.attention_bias,
            max_position_embeddings=self.max_position_embeddings,
            layer_types=list(self.layer_types),
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        if dtype is not None:
            d["dtype"] = dtype
        window = self.sliding_window
        if self.is_gemma:
            d.update(
                hidden_activation=self.activation,
                query_pre_attn_scalar=self.query_pre_attn_scalar,
                attn_logit_softcapping=self.attn_logit_softcapping,
                final_logit_softcapping=self.final_logit_softcapping,
                rope_parameters={FULL: _rope_dict(self.rope_full), SLIDING: _rope_dict(self.rope_sliding or self.rope_full)},
                use_bidirectional_attention=False,
            )
        else:
            d.update(hidden_act=self.activation, rope_parameters=_rope_dict(self.rope_full))
        if self.attention == "bidirectional":
            if self.is_gemma and self.bidirectional_window == "half":
                d["use_bidirectional_attention"] = True  # transformers halves the declared window itself
            else:
                d["is_causal"] = False  # generic route: sliding layers see |i-j| <= W
                if window is not None and self.bidirectional_window == "half":
                    window //= 2  # |i-j| <= W//2 expressed through the generic inclusive window
                elif window is not None and self.bidirectional_window == "none":
                    window = max(self.max_position_embeddings, window)
        d["sliding_window"] = window
        if not self.is_gemma:
            d["use_sliding_window"] = window is not None and SLIDING in self.layer_types
        return d

    @classmethod
    def from_json_file(cls, path: str | Path, **overrides: Any) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}; point to a Hugging Face model directory")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_hf_dict(d, **overrides)


_CONSUMED_KEYS = {
    "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "layer_types", "rope_parameters", "rope_theta", "rope_local_base_freq",
    "rope_scaling", "sliding_window", "sliding_window_pattern", "_sliding_window_pattern", "use_sliding_window",
    "max_window_layers", "query_pre_attn_scalar", "rms_norm_eps", "hidden_activation", "hidden_act",
    "tie_word_embeddings", "attention_bias", "attn_logit_softcapping", "final_logit_softcapping",
    "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "use_bidirectional_attention",
    "is_causal", "dtype", "torch_dtype", "transformers_version",
}  # fmt: skip


def _rope_dict(rope: Rope) -> dict[str, Any]:
    if rope.factor == 1.0:
        return {"rope_type": "default", "rope_theta": rope.theta}
    return {"rope_type": "linear", "factor": rope.factor, "rope_theta": rope.theta}


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
    if gemma and d.get("use_bidirectional_attention"):
        return {"attention": "bidirectional", "bidirectional_window": "half"}
    if d.get("is_causal") is False:
        return {"attention": "bidirectional", "bidirectional_window": "full"}
    return {"attention": "causal"}


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
        sliding_window=d.get("sliding_window", 4096),
        query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256),
        activation=d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh",
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        attn_logit_softcapping=d.get("attn_logit_softcapping"),
        final_logit_softcapping=d.get("final_logit_softcapping"),
        **_attention_fields(d, gemma=True),
    )


def _qwen3_fields(d: Mapping[str, Any]) -> dict[str, Any]:
    fields = _common_fields(d, head_dim_default=128)
    n = fields["num_layers"]
    window = d.get("sliding_window") if d.get("use_sliding_window") else None  # as Qwen3Config.__post_init__
    max_window_layers = d.get("max_window_layers", 28)
    layer_types = d.get("layer_types") or [
        SLIDING if window is not None and i >= max_window_layers else FULL for i in range(n)
    ]
    params = d.get("rope_parameters") or d.get("rope_scaling")
    return dict(
        fields,
        layer_types=tuple(layer_types),
        rope_full=_parse_rope(params, d.get("rope_theta", 10_000.0)),
        sliding_window=window if SLIDING in layer_types else None,
        activation=d.get("hidden_act", "silu"),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        **_attention_fields(d, gemma=False),
    )
