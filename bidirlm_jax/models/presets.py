"""Architectures of every published Gemma3 (text) and Qwen3 size, plus tiny ones for tests.

Values are those of the models' own `config.json` files; `tests/test_presets.py` checks that the
parameter counts equal transformers' for the same configs (and the four BidirLM bases exactly).
"""

from __future__ import annotations

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models.config import FULL, SLIDING, ModelConfig, Rope


def _gemma3(
    hidden,
    intermediate,
    layers,
    heads,
    kv_heads,
    *,
    vocab=262_208,
    head_dim=256,
    window=1024,
    scalar=256,
    rope_factor=8.0,
    max_positions=131_072,
    pattern=6,
    **kw,
) -> ModelConfig:
    return ModelConfig(
        family="gemma3",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        layer_types=tuple(SLIDING if (i + 1) % pattern else FULL for i in range(layers)),
        rope_full=Rope(1_000_000.0, rope_factor),
        rope_sliding=Rope(10_000.0),
        sliding_window=window,
        query_pre_attn_scalar=scalar,
        activation="gelu_pytorch_tanh",
        norm_plus_one=True,
        post_norms=True,
        embed_scale=True,
        tie_word_embeddings=True,
        max_position_embeddings=max_positions,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        **kw,
    )


def _qwen3(
    hidden,
    intermediate,
    layers,
    heads,
    kv_heads,
    *,
    tied,
    vocab=151_936,
    head_dim=128,
    max_positions=40_960,
    bos=151_643,
    eos=151_645,
    **kw,
) -> ModelConfig:
    return ModelConfig(
        family="qwen3",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        layer_types=(FULL,) * layers,
        rope_full=Rope(1_000_000.0),
        activation="silu",
        tie_word_embeddings=tied,
        max_position_embeddings=max_positions,
        bos_token_id=bos,
        eos_token_id=eos,
        **kw,
    )


PRESETS: dict[str, ModelConfig] = {
    "gemma3-270m": _gemma3(640, 2048, 18, 4, 1, vocab=262_144, window=512, rope_factor=1.0, max_positions=32_768),
    "gemma3-1b": _gemma3(1152, 6912, 26, 4, 1, vocab=262_144, window=512, rope_factor=1.0, max_positions=32_768),
    "gemma3-4b": _gemma3(2560, 10240, 34, 8, 4),
    "gemma3-12b": _gemma3(3840, 15360, 48, 16, 8),
    "gemma3-27b": _gemma3(5376, 21504, 62, 32, 16, head_dim=128, scalar=168),
    "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, 8, tied=True),
    "qwen3-1.7b": _qwen3(2048, 6144, 28, 16, 8, tied=True),
    "qwen3-4b": _qwen3(2560, 9728, 36, 32, 8, tied=True),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, 8, tied=False),
    "qwen3-14b": _qwen3(5120, 17408, 40, 40, 8, tied=False),
    "qwen3-32b": _qwen3(5120, 25600, 64, 64, 8, tied=False),
    # Tiny shapes for tests, notebooks and first contact (seconds on a CPU).
    "tiny-gemma3": _gemma3(
        64, 128, 4, 4, 2, vocab=512, head_dim=32, window=8, scalar=32, rope_factor=1.0, max_positions=512, pattern=2
    ),
    "tiny-qwen3": _qwen3(64, 128, 2, 4, 2, tied=True, vocab=512, head_dim=32, max_positions=512, bos=1, eos=2),
    # The benchmark model used throughout the project (41.6M parameters).
    "bench-qwen3": _qwen3(512, 1536, 8, 8, 4, tied=True, vocab=32_000, head_dim=64, max_positions=4096, bos=1, eos=2),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """A preset by name, with optional architecture overrides (e.g. `num_layers=2`; run settings are a `Runtime`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
