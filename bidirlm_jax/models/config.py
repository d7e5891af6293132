"""One config for every supported decoder; `io/hf_config.py` reads and writes it as transformers' `config.json`.

Gemma3 and Qwen3 differ only in details, each a named field: Gemma3 normalises with `(1 + w)`
(`norm_plus_one`), adds post-attention and post-MLP norms (`post_norms`), scales embeddings by √d
(`embed_scale`), uses GELU-tanh (`activation`), a `query_pre_attn_scalar` attention scale, and
alternates sliding and global layers with two RoPE bases; Qwen3-VL's text model adds interleaved
M-RoPE (`mrope_section`). The model reads only these fields, never `family`, which names the export
format; `io/families.py` and `io/hf_config.py` map a family to its flags and fields, so a third family is a
config. The config is frozen and hashable because NNX keeps it in the model's static graph definition.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from bidirlm_jax.errors import ConfigError

FULL = "full_attention"
SLIDING = "sliding_attention"
POOLING_MODES = ("mean", "last", "first")  # how an encoder turns hidden states into one embedding (models.pooling)


@dataclass(frozen=True)
class Rope:
    """Rotary embedding of one layer type: base frequency and linear position-interpolation factor."""

    theta: float
    factor: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder: what its weights are and compute (how to run them is a `models.runtime.Runtime`)."""

    family: str  # the transformers format it exports to ("gemma3", "qwen3": io.hf_config), never read by the model
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
    norm_plus_one: bool = False  # RMSNorm scales by (1 + w) in fp32 (Gemma) instead of by w in the input dtype
    post_norms: bool = False  # each branch's output is normalised before the residual add (Gemma3)
    embed_scale: bool = False  # embeddings × √d, rounded to the compute dtype (Gemma)
    qk_norm: bool = True  # RMSNorm over head_dim on queries and keys before RoPE
    # Interleaved M-RoPE (Qwen3-VL): frequencies per axis (T, H, W); sizes past head_dim/2 are clipped, as transformers does.
    mrope_section: tuple[int, int, int] | None = None
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    attn_logit_softcapping: float | None = None  # kept for export; transformers' Gemma3 never applies it
    final_logit_softcapping: float | None = None
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Fields of the source config.json this class does not model, JSON-encoded, carried into exports.
    extra: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def __post_init__(self):
        if min(self.num_heads, self.num_kv_heads, self.head_dim, self.hidden_size, self.num_layers) <= 0:
            raise ConfigError(
                "invalid model config: heads, KV heads, head_dim, hidden_size and layers must be positive, got "
                f"{self.num_heads}/{self.num_kv_heads}/{self.head_dim}/{self.hidden_size}/{self.num_layers}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"invalid model config: head_dim {self.head_dim} must be even (RoPE rotates pairs)")
        checks = [
            (
                len(self.layer_types) == self.num_layers,
                f"{len(self.layer_types)} layer_types for {self.num_layers} layers",
            ),
            (
                set(self.layer_types) <= {FULL, SLIDING},
                f"unknown layer types {set(self.layer_types) - {FULL, SLIDING}}",
            ),
            (
                self.num_heads % self.num_kv_heads == 0,
                f"{self.num_heads} heads not a multiple of {self.num_kv_heads} KV heads",
            ),
            (
                SLIDING not in self.layer_types or (self.sliding_window or 0) > 0,
                "sliding layers need a positive sliding_window",
            ),
            (
                self.mrope_section is None or (len(self.mrope_section) == 3 and min(self.mrope_section) >= 0),
                f"mrope_section {self.mrope_section} must be 3 sizes ≥ 0 (temporal, height, width)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"invalid model config: {message}")

    # --- derived properties -------------------------------------------------------------------
    @property
    def attention_scale(self) -> float:
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def rope_for(self, layer_type: str) -> Rope:
        return self.rope_sliding if layer_type == SLIDING and self.rope_sliding else self.rope_full

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)
