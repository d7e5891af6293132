"""The model families io reads and writes, as tables: each config.json `model_type`'s family, what each
family's architecture does beyond `ModelConfig`'s defaults, the transformers classes it exports to and its
reserved mask row. A third family is entries here (and its field names in `io.hf_config`), not a branch in
the model.
"""

from __future__ import annotations

from typing import Any

# model_type -> family; multimodal types contribute their `text_config`.
TEXT_MODEL_TYPES = {"gemma3_text": "gemma3", "qwen3": "qwen3", "qwen3_vl_text": "qwen3", "bidirlm_omni_text": "qwen3"}
MULTIMODAL_MODEL_TYPES = {"gemma3": "gemma3", "qwen3_vl": "qwen3", "qwen3_asr": "qwen3", "bidirlm_omni": "qwen3"}
MULTIMODAL_TEXT_TYPES = {
    "gemma3": "gemma3_text",
    "qwen3_vl": "qwen3_vl_text",
    "qwen3_asr": "qwen3",
    "bidirlm_omni": "bidirlm_omni_text",
}
# transformers' Qwen3-VL text model (and BidirLM-Omni's remote one) rotates with M-RoPE [24, 20, 20] when
# its config names no sections.
MROPE_DEFAULTS = {"qwen3_vl_text": (24, 20, 20), "bidirlm_omni_text": (24, 20, 20)}
# A remote-code config class's defaults for its text_config: transformers writes only the fields that
# differ from them, so a field the file omits means these (BidirLM-Omni's `BidirLMOmniTextConfig`, whose
# model is always bidirectional).
MULTIMODAL_TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "bidirlm_omni": dict(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=22016,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_dim=128,
        hidden_act="silu",
        max_position_embeddings=128000,
        rms_norm_eps=1e-6,
        rope_theta=5_000_000.0,
        attention_bias=False,
        is_causal=False,
    )
}
# BidirLM's released text type and the authors' earlier ones -> the native type they hold (io.released; None:
# read from the config).
RELEASED_MODEL_TYPES = {"bidirlm": None, "biqwen3": "qwen3", "bigemma3_text": "gemma3_text"}
SUPPORTED_MODEL_TYPES = tuple(TEXT_MODEL_TYPES) + tuple(MULTIMODAL_MODEL_TYPES) + tuple(RELEASED_MODEL_TYPES)
ARCHITECTURES = {"gemma3": "Gemma3ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
EXPORT_MODEL_TYPES = {"gemma3": "gemma3_text", "qwen3": "qwen3"}
# What each family's architecture does beyond `ModelConfig`'s defaults (models.config names each flag).
FAMILY_FLAGS: dict[str, dict[str, Any]] = {
    "gemma3": dict(norm_plus_one=True, post_norms=True, embed_scale=True),
    "qwen3": {},
}
# The transformers classes a head exports to (io.heads); a family without one cannot export that head.
SEQUENCE_CLASSES = {"gemma3": "Gemma3TextForSequenceClassification", "qwen3": "Qwen3ForSequenceClassification"}
TOKEN_CLASSES = {"qwen3": "Qwen3ForTokenClassification"}
# The reserved Qwen3 row BidirLM masks with (`<|repo_name|>` in the stock vocabulary, renamed `<|mask|>` in
# their tokenizer): no embedding resize, and its row is trained by MNTP.
QWEN3_MASK_ID = 151663
# The row MNTP masks with when a family's tokenizer has no mask token (io.tokenizer.resolve_mask_token).
RESERVED_MASK_IDS: dict[str, int] = {"qwen3": QWEN3_MASK_ID}
