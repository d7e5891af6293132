"""The text model's weight tables: the backbone (embedding, layers, final norm) and the LM head."""

from __future__ import annotations

from bidirlm_jax.io.layouts import HEAD, LM_HEAD, TEXT
from bidirlm_jax.io.weights.table import Table, WeightEntry, entry
from bidirlm_jax.models.config import ModelConfig


def backbone_table(config: ModelConfig) -> Table:
    d, f, h, kv, hd = (
        config.hidden_size,
        config.intermediate_size,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
    )
    entries = [entry(("embedder", "embedding"), "embed_tokens.weight", (config.vocab_size, d))]

    def add(*args):
        entries.append(entry(*args))

    norms = {"attn_norm": "input_layernorm"}
    if config.post_norms:
        norms.update(
            post_attn_norm="post_attention_layernorm",
            mlp_norm="pre_feedforward_layernorm",
            post_mlp_norm="post_feedforward_layernorm",
        )
    else:
        norms.update(mlp_norm="post_attention_layernorm")
    for i in range(config.num_layers):
        p = f"layers.{i}."
        for ours, theirs in norms.items():
            add(("layers", i, ours, "weight"), f"{p}{theirs}.weight", (d,))
        for name, heads in (("q", h), ("k", kv), ("v", kv)):
            add(
                ("layers", i, "attn", f"{name}_proj"),
                f"{p}self_attn.{name}_proj.weight",
                (heads * hd, d),
                (heads, hd, d),
            )
            if config.attention_bias:
                add(("layers", i, "attn", f"{name}_bias"), f"{p}self_attn.{name}_proj.bias", (heads * hd,), (heads, hd))
        add(("layers", i, "attn", "o_proj"), f"{p}self_attn.o_proj.weight", (d, h * hd), (d, h, hd))
        if config.attention_bias:
            add(("layers", i, "attn", "o_bias"), f"{p}self_attn.o_proj.bias", (d,))
        for name in ("q_norm", "k_norm") if config.qk_norm else ():
            add(("layers", i, "attn", name, "weight"), f"{p}self_attn.{name}.weight", (hd,))
        add(("layers", i, "mlp", "gate_proj"), f"{p}mlp.gate_proj.weight", (f, d))
        add(("layers", i, "mlp", "up_proj"), f"{p}mlp.up_proj.weight", (f, d))
        add(("layers", i, "mlp", "down_proj"), f"{p}mlp.down_proj.weight", (d, f))
    add(("final_norm", "weight"), "norm.weight", (d,))
    return Table(TEXT, tuple(entries))


def head_table(config: ModelConfig) -> Table:
    """The LM head: its own matrix, or nothing to read when tied to the embedding (a checkpoint may still
    hold a copy, which is ignored)."""
    if config.tie_word_embeddings:
        return Table(HEAD, (), ignored=frozenset({LM_HEAD}))
    return Table(HEAD, (entry(("lm_head",), LM_HEAD, (config.vocab_size, config.hidden_size)),))


def text_tables(config: ModelConfig) -> tuple[Table, Table]:
    """What a `Transformer` (causal LM or encoder with an LM head) reads and writes."""
    return backbone_table(config), head_table(config)


def weight_table(config: ModelConfig) -> list[WeightEntry]:
    """Every parameter of a `Transformer`, backbone then head, with backbone-relative keys."""
    return [e for table in text_tables(config) for e in table.entries]
