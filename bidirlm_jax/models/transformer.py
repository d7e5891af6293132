"""The decoder stack, causal or bidirectional, for every family the config describes.

Layers run unrolled (`nnx.List` of blocks, one traced copy each) or, with `config.scan_layers`, as one
block scanned over parameters stacked on a leading `layers` axis, so compile time stays flat in depth.
A scanned layer picks its layer type's RoPE table and attention mask by data: an index per layer
selects among the stacked tables and (`lax.switch`) among the layer types' kernel calls. Checkpoints
and HF conversion keep the per-layer layout; `stack_layers` / `unstack_layers` convert at the boundary.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bidirlm_jax.kernels.attention import attend
from bidirlm_jax.models.attention import AttendFn, Attention
from bidirlm_jax.models.config import ModelConfig
from bidirlm_jax.models.layers import MLP, Embedder, RMSNorm, linear, param, rope_tables
from bidirlm_jax.models.masks import Segments, layer_specs
from bidirlm_jax.sharding import constrain

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
LAYER_AXIS = "layers"  # logical name of the stacked parameters' leading axis (never sharded)


@jax.tree_util.register_dataclass
@dataclass
class ModelOutput:
    """What `Transformer.__call__` returns: fp32 LM logits and the final-normed hidden states."""

    logits: jax.Array  # [B, T, vocab]
    hidden_states: jax.Array  # [B, T, d], after the final norm


class Block(nnx.Module):
    """Pre-norm residual block; Gemma3 also normalises each branch's output before the residual add."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d = config.hidden_size
        self.attn_norm = RMSNorm(d, config, rngs=rngs)
        self.attn = Attention(config, rngs=rngs)
        self.mlp_norm = RMSNorm(d, config, rngs=rngs)
        self.mlp = MLP(config, rngs=rngs)
        if config.is_gemma:
            self.post_attn_norm = RMSNorm(d, config, rngs=rngs)
            self.post_mlp_norm = RMSNorm(d, config, rngs=rngs)
        self.post_norms = config.is_gemma

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], attend: AttendFn) -> jax.Array:
        h = self.attn(self.attn_norm(x), rope, attend)
        x = x + (self.post_attn_norm(h) if self.post_norms else h)
        h = self.mlp(self.mlp_norm(x))
        x = x + (self.post_mlp_norm(h) if self.post_norms else h)
        return constrain(x, ("batch", "seq", "embed"))


class Transformer(nnx.Module):
    """`model(input_ids, attention_mask=None, *, segment_ids=None, positions=None) -> ModelOutput`.

    `attention_mask` [B, T] marks real tokens (1) and padding (0), on either side. `segment_ids` [B, T]
    packs several documents into one row; pass `positions` restarting at 0 in each document to give
    each the RoPE positions it would have alone (default 0..T-1 for every row, as transformers' forward does).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embedder = Embedder(config, rngs=rngs)
        blocks = [Block(config, rngs=rngs) for _ in config.layer_types]
        self.layers = _stacked(blocks) if config.scan_layers else nnx.List(blocks)
        self.final_norm = RMSNorm(config.hidden_size, config, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), config)

    def encode(self, input_ids, attention_mask=None, *, segment_ids=None, positions=None) -> jax.Array:
        """Final-normed hidden states [B, T, d]."""
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        positions = jnp.asarray(positions)
        dtype = jnp.dtype(cfg.dtype)
        segments = Segments.of(attention_mask, segment_ids, (b, t))
        specs = layer_specs(cfg)
        kernel = functools.partial(attend, segments=segments, scale=cfg.attention_scale,
                                   implementation=cfg.attention_impl, block_q=cfg.attention_block_q,
                                   block_kv=cfg.attention_block_kv)  # fmt: skip
        attends = {lt: functools.partial(kernel, spec=spec, layer_type=lt) for lt, spec in specs.items()}
        ropes = {lt: rope_tables(positions, cfg.rope_for(lt), cfg.head_dim, dtype) for lt in specs}

        x = constrain(self.embedder(input_ids), ("batch", "seq", "embed"))
        x = self._scanned(x, ropes, attends) if cfg.scan_layers else self._unrolled(x, ropes, attends)
        return self.final_norm(x)

    def _remat(self, fn):
        policy = self.config.remat
        return fn if policy == "none" else jax.checkpoint(fn, policy=_REMAT_POLICIES[policy])

    def _unrolled(self, x, ropes, attends) -> jax.Array:
        def layer(graphdef, state, x, rope, attend):
            return nnx.merge(graphdef, state)(x, rope, attend)

        for block, layer_type in zip(self.layers, self.config.layer_types):
            graphdef, state = nnx.split(block)
            run = self._remat(functools.partial(layer, graphdef, attend=attends[layer_type]))
            x = run(state, x, ropes[layer_type])
        return x

    def _scanned(self, x, ropes, attends) -> jax.Array:
        types = list(attends)
        index = jnp.asarray([types.index(lt) for lt in self.config.layer_types], jnp.int32)
        cos, sin = (jnp.stack([ropes[lt][n] for lt in types]) for n in (0, 1))
        calls = [attends[lt] for lt in types]
        graphdef, state = nnx.split(self.layers)

        def layer(x, state, i):
            attend = calls[0] if len(calls) == 1 else functools.partial(jax.lax.switch, i, calls)
            return nnx.merge(graphdef, state)(x, (cos[i], sin[i]), attend)

        run = self._remat(layer)
        x, _ = jax.lax.scan(lambda x, xs: (run(x, *xs), None), x, (state, index))
        return x

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


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _stack_values(values: list):
    first = values[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(values), *first.shape), first.dtype)
    if isinstance(first, np.ndarray):
        return np.stack(values)
    return jnp.stack(values)


def _stack(*leaves):
    first = leaves[0]
    if not _is_variable(first):
        return _stack_values(list(leaves))
    value = _stack_values([leaf.get_value() for leaf in leaves])
    axes = first.get_metadata().get("out_sharding")
    return first.replace(value, **({"out_sharding": (LAYER_AXIS, *axes)} if axes else {}))


def _unstack(leaf, i: int):
    if not _is_variable(leaf):
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
        return leaf[i]
    axes = leaf.get_metadata().get("out_sharding")
    return leaf.replace(_unstack(leaf.get_value(), i), **({"out_sharding": tuple(axes[1:])} if axes else {}))


def _with_layers(state, layers):
    if isinstance(state, nnx.State):
        return nnx.State({**state, "layers": layers})
    return {**state, "layers": layers}


def stack_layers(state):
    """A model state (nnx.State or nested dict; Variables, arrays or ShapeDtypeStructs) with per-layer
    `layers/{i}/...` entries → one `layers/...` entry per parameter, stacked on a leading axis (the
    layout of `scan_layers=True`)."""
    layers = state["layers"]
    per_layer = [layers[i] for i in range(len(layers))]
    return _with_layers(state, jax.tree.map(_stack, *per_layer, is_leaf=_is_variable))


def unstack_layers(state):
    """The inverse of `stack_layers`: stacked `layers/...` → per-layer `layers/{i}/...`."""
    layers = state["layers"]
    count = jax.tree.leaves(layers, is_leaf=_is_variable)[0].shape[0]
    per_layer = {i: jax.tree.map(lambda x, i=i: _unstack(x, i), layers, is_leaf=_is_variable) for i in range(count)}
    return _with_layers(state, nnx.State(per_layer) if isinstance(state, nnx.State) else per_layer)


def relayout(model: Transformer, scan_layers: bool) -> Transformer:
    """`model` with its layers scanned (stacked parameters) or unrolled: the boundary between a scanned
    training state and the per-layer layout of checkpoints and HF files. Arrays are restacked, not shared."""
    if model.config.scan_layers == scan_layers:
        return model
    graphdef, _ = abstract_model(model.config.replace(scan_layers=scan_layers))
    state = nnx.state(model)
    return nnx.merge(graphdef, stack_layers(state) if scan_layers else unstack_layers(state))


def _stacked(blocks: list[Block]) -> Block:
    """One block holding every block's parameters stacked on a leading `layers` axis."""
    graphdef, _ = nnx.split(blocks[0])
    states = [nnx.split(b)[1] for b in blocks]
    return nnx.merge(graphdef, jax.tree.map(_stack, *states, is_leaf=_is_variable))


@functools.lru_cache(maxsize=16)
def abstract_model(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and shape-only state of a model (no memory); cached, since tracing the
    initialisers of a large model takes about a second."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
