"""The decoder stack, causal or bidirectional, for every family the config describes."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from bidirlm_jax.models.attention import Attention, build_masks
from bidirlm_jax.models.config import ModelConfig
from bidirlm_jax.models.layers import MLP, Embedder, RMSNorm, linear, param, rope_tables
from bidirlm_jax.sharding import constrain

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@jax.tree_util.register_dataclass
@dataclass
class ModelOutput:
    """What `Transformer.__call__` returns: fp32 LM logits and the final-normed hidden states."""

    logits: jax.Array  # [B, T, vocab]
    hidden_states: jax.Array  # [B, T, d], after the final norm


class Block(nnx.Module):
    """Pre-norm residual block; Gemma3 also normalises each branch's output before the residual add."""

    def __init__(self, config: ModelConfig, layer_type: str, *, rngs: nnx.Rngs):
        d = config.hidden_size
        self.attn_norm = RMSNorm(d, config, rngs=rngs)
        self.attn = Attention(config, layer_type, rngs=rngs)
        self.mlp_norm = RMSNorm(d, config, rngs=rngs)
        self.mlp = MLP(config, rngs=rngs)
        if config.is_gemma:
            self.post_attn_norm = RMSNorm(d, config, rngs=rngs)
            self.post_mlp_norm = RMSNorm(d, config, rngs=rngs)
        self.post_norms = config.is_gemma

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], mask: jax.Array) -> jax.Array:
        h = self.attn(self.attn_norm(x), rope, mask)
        x = x + (self.post_attn_norm(h) if self.post_norms else h)
        h = self.mlp(self.mlp_norm(x))
        x = x + (self.post_mlp_norm(h) if self.post_norms else h)
        return constrain(x, ("batch", "seq", "embed"))


def _run_block(block: Block, x, rope, mask):
    return block(x, rope, mask)


class Transformer(nnx.Module):
    """`model(input_ids, attention_mask=None, *, segment_ids=None, positions=None) -> ModelOutput`.

    `attention_mask` [B, T] marks real tokens (1) and padding (0), on either side. `segment_ids` [B, T]
    packs several documents into one row; pass `positions` restarting at 0 in each document to give
    each the RoPE positions it would have alone (default 0..T-1 for every row, as transformers' forward does).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embedder = Embedder(config, rngs=rngs)
        self.layers = nnx.List([Block(config, layer_type, rngs=rngs) for layer_type in config.layer_types])
        self.final_norm = RMSNorm(config.hidden_size, config, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), config)
        run = _run_block
        if config.remat != "none":
            run = nnx.remat(_run_block, policy=_REMAT_POLICIES[config.remat])
        self._run_block = run

    def encode(self, input_ids, attention_mask=None, *, segment_ids=None, positions=None) -> jax.Array:
        """Final-normed hidden states [B, T, d]."""
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        b, t = input_ids.shape
        attention_mask = jnp.ones((b, t), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        positions = jnp.asarray(positions)
        segment_ids = None if segment_ids is None else jnp.asarray(segment_ids)
        dtype = jnp.dtype(cfg.dtype)

        x = constrain(self.embedder(input_ids), ("batch", "seq", "embed"))
        masks = build_masks(cfg, attention_mask, segment_ids)
        ropes = {lt: rope_tables(positions, cfg.rope_for(lt), cfg.head_dim, dtype) for lt in masks}
        for layer_type, block in zip(cfg.layer_types, self.layers):
            x = self._run_block(block, x, ropes[layer_type], masks[layer_type])
        return self.final_norm(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM-head logits in fp32 (bf16 inputs are multiplied with fp32 accumulation)."""
        w = self.embedder.embedding if self.config.tie_word_embeddings else self.lm_head
        logits = linear(hidden, w, preferred_element_type=jnp.float32)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = jnp.tanh(logits / cap) * cap
        return constrain(logits, ("batch", "seq", "vocab"))

    def __call__(self, input_ids, attention_mask=None, *, segment_ids=None, positions=None) -> ModelOutput:
        hidden = self.encode(input_ids, attention_mask, segment_ids=segment_ids, positions=positions)
        return ModelOutput(logits=self.logits(hidden), hidden_states=hidden)


@functools.lru_cache(maxsize=16)
def abstract_model(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and shape-only state of a model (no memory); cached, since tracing the
    initialisers of a large model takes about a second."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
