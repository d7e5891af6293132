"""The decoder stack, causal or bidirectional, for every family the config describes.

`embed(input_ids)` → `backbone(x, positions=..., segments=..., add=...)` → final-normed hidden states;
`hidden_states` chains them from ids or from precomputed embeddings (a tower's tokens merged into the
text), `__call__` adds the LM head. Positions are `[B, T]` (RoPE) or `[3, B, T]` (M-RoPE).

Layers run unrolled (`nnx.List` of blocks, one traced copy each) or, with `runtime.scan_layers`, as one
block scanned over parameters stacked on a leading `layers` axis, so compile time stays flat in depth.
A scanned layer picks its layer type's RoPE table and attention mask by data: an index per layer
selects among the stacked tables and (`lax.switch`) among the layer types' kernel calls. `add`
(`{layer: [B, T, d]}`, Qwen3-VL's DeepStack features) is added to the residual stream after the given
layers; scanned, the layers up to the last addition run unrolled and the rest stays one scan, so towers
keep scanning available. Checkpoints and HF conversion keep the per-layer layout; `stack_layers` /
`unstack_layers` convert at the boundary.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.kernels.attention import attend
from bidirlm_jax.kernels.masks import MaskSpec, Segments
from bidirlm_jax.models.attention import AttendFn, Attention
from bidirlm_jax.models.config import ModelConfig
from bidirlm_jax.models.layers import LAYER_AXIS, MLP, Embedder, RMSNorm, linear, param
from bidirlm_jax.models.lora import layer_scope
from bidirlm_jax.models.masks import layer_specs
from bidirlm_jax.models.positions import rope_tables
from bidirlm_jax.models.runtime import DEFAULT_RUNTIME, Runtime
from bidirlm_jax.sharding import constrain

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
HIDDEN_AXES = ("batch", "seq", "embed")


@jax.tree_util.register_dataclass
@dataclass
class ModelOutput:
    """What `Transformer.__call__` returns: fp32 LM logits and the final-normed hidden states."""

    logits: jax.Array  # [B, T, vocab]
    hidden_states: jax.Array  # [B, T, d], after the final norm


def rms_norm(config: ModelConfig, dim: int, param_dtype: str, rngs: nnx.Rngs) -> RMSNorm:
    """An RMSNorm of the config's kind."""
    return RMSNorm(dim, eps=config.rms_norm_eps, plus_one=config.norm_plus_one, param_dtype=param_dtype, rngs=rngs)


class Block(nnx.Module):
    """Pre-norm residual block; with `post_norms` (Gemma3) each branch's output is normalised before the add."""

    def __init__(self, config: ModelConfig, *, param_dtype: str = "float32", rngs: nnx.Rngs):
        d = config.hidden_size
        self.attn_norm = rms_norm(config, d, param_dtype, rngs)
        self.attn = Attention(
            d,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            param_dtype=param_dtype,
            bias=config.attention_bias,
            qk_norm=config.qk_norm,
            norm_eps=config.rms_norm_eps,
            norm_plus_one=config.norm_plus_one,
            scale=config.attention_scale,
            rngs=rngs,
        )
        self.mlp_norm = rms_norm(config, d, param_dtype, rngs)
        self.mlp = MLP(d, config.intermediate_size, activation=config.activation, param_dtype=param_dtype, rngs=rngs)
        if config.post_norms:
            self.post_attn_norm = rms_norm(config, d, param_dtype, rngs)
            self.post_mlp_norm = rms_norm(config, d, param_dtype, rngs)
        self.post_norms = config.post_norms

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], attend: AttendFn) -> jax.Array:
        h = self.attn(self.attn_norm(x), rope, attend)
        x = x + (self.post_attn_norm(h) if self.post_norms else h)
        h = self.mlp(self.mlp_norm(x))
        x = x + (self.post_mlp_norm(h) if self.post_norms else h)
        return constrain(x, HIDDEN_AXES)


class Transformer(nnx.Module):
    """`model(input_ids, attention_mask=None, *, segment_ids=None, positions=None) -> ModelOutput`.

    `attention_mask` [B, T] marks real tokens (1) and padding (0), on either side. `segment_ids` [B, T]
    packs several documents into one row; pass `positions` restarting at 0 in each document to give
    each the RoPE positions it would have alone (default 0..T-1 for every row, as transformers' forward does).
    `config` is the architecture (what the weights are), `runtime` how to run it (`models.runtime`).
    """

    def __init__(self, config: ModelConfig, runtime: Runtime = DEFAULT_RUNTIME, *, rngs: nnx.Rngs):
        self.config = config
        self.runtime = runtime
        scale = config.hidden_size**0.5 if config.embed_scale else None
        pdtype = runtime.param_dtype
        dtypes = dict(dtype=runtime.dtype, param_dtype=pdtype)
        self.embedder = Embedder(config.vocab_size, config.hidden_size, **dtypes, scale=scale, rngs=rngs)
        blocks = [Block(config, param_dtype=pdtype, rngs=rngs) for _ in config.layer_types]
        self.layers = _stacked(blocks) if runtime.scan_layers else nnx.List(blocks)
        self.final_norm = rms_norm(config, config.hidden_size, pdtype, rngs)
        if not config.tie_word_embeddings:
            self.lm_head = param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), pdtype)

    def embed(self, input_ids) -> jax.Array:
        """Token embeddings [B, T, d] in the compute dtype (scaled as the config says)."""
        return constrain(self.embedder(jnp.asarray(input_ids)), HIDDEN_AXES)

    def backbone(
        self, x: jax.Array, *, positions: jax.Array, segments: Segments, add: Mapping[int, jax.Array] | None = None
    ) -> jax.Array:
        """The layers and the final norm over embeddings `x` [B, T, d]: final-normed hidden states.

        `positions` [B, T] or [3, B, T] (M-RoPE); `add` `{layer: [B, T, d]}` is added to the residual
        stream after each given layer (0-based).
        """
        cfg = self.config
        add = dict(add or {})
        if any(not 0 <= k < cfg.num_layers for k in add):
            raise ConfigError(f"additions after layers {sorted(add)}: the model has layers 0..{cfg.num_layers - 1}")
        run = self.runtime
        specs = layer_specs(cfg, run)
        attends = {lt: self._kernel(spec, segments, lt) for lt, spec in specs.items()}
        positions = jnp.asarray(positions)
        dtype = jnp.dtype(run.dtype)
        ropes = {lt: rope_tables(positions, cfg.rope_for(lt), cfg.head_dim, dtype, cfg.mrope_section) for lt in specs}
        x = self._scanned(x, ropes, attends, add) if run.scan_layers else self._unrolled(x, ropes, attends, add)
        return self.final_norm(x)

    def hidden_states(
        self,
        input_ids=None,
        attention_mask=None,
        *,
        segment_ids=None,
        positions=None,
        inputs_embeds=None,
        add: Mapping[int, jax.Array] | None = None,
    ) -> jax.Array:
        """Final-normed hidden states [B, T, d] of `input_ids`, or of `inputs_embeds` [B, T, d] given instead
        (embeddings with a tower's tokens merged in; cast to the compute dtype, as `embed` returns)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ConfigError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            x = self.embed(input_ids)
        else:
            x = constrain(jnp.asarray(inputs_embeds).astype(self.runtime.dtype), HIDDEN_AXES)
        b, t = x.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        segments = Segments.of(attention_mask, segment_ids, (b, t))
        return self.backbone(x, positions=positions, segments=segments, add=add)

    def _kernel(self, spec: MaskSpec, segments: Segments, layer_type: str) -> AttendFn:
        """One layer type's `attend(q, k, v, scale)`: its mask band, the call's segments, the kernel settings."""
        run = self.runtime

        def call(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
            blocks = dict(block_q=run.attention_block_q, block_kv=run.attention_block_kv)
            kernel = dict(implementation=run.attention_impl, layer_type=layer_type, **blocks)
            return attend(q, k, v, spec, segments, scale=scale, **kernel)

        return call

    def _remat(self, fn):
        policy = self.runtime.remat
        return fn if policy == "none" else jax.checkpoint(fn, policy=_REMAT_POLICIES[policy])

    @staticmethod
    def _plus(x: jax.Array, extra: jax.Array | None) -> jax.Array:
        return x if extra is None else constrain(x + jnp.asarray(extra).astype(x.dtype), HIDDEN_AXES)

    def _run_layer(self, graphdef, state, x, rope, attend) -> jax.Array:
        def layer(state, x, rope):
            return nnx.merge(graphdef, state)(x, rope, attend)

        return self._remat(layer)(state, x, rope)

    def _unrolled(self, x, ropes, attends, add) -> jax.Array:
        for i, (block, layer_type) in enumerate(zip(self.layers, self.config.layer_types)):
            graphdef, state = nnx.split(block)
            with layer_scope(i):
                x = self._plus(self._run_layer(graphdef, state, x, ropes[layer_type], attends[layer_type]), add.get(i))
        return x

    def _scanned(self, x, ropes, attends, add) -> jax.Array:
        """Layers 0..max(add) unrolled from the stacked parameters, then one scan over the rest."""
        layer_types = self.config.layer_types
        graphdef, state = nnx.split(self.layers)
        prefix = max(add) + 1 if add else 0
        for i in range(prefix):
            layer = jax.tree.map(lambda a, i=i: a[i], state)
            lt = layer_types[i]
            with layer_scope(i):
                x = self._plus(self._run_layer(graphdef, layer, x, ropes[lt], attends[lt]), add.get(i))
        if prefix == len(layer_types):
            return x
        types = list(attends)
        index = jnp.asarray([types.index(lt) for lt in layer_types[prefix:]], jnp.int32)
        cos, sin = (jnp.stack([ropes[lt][n] for lt in types]) for n in (0, 1))
        calls = [attends[lt] for lt in types]

        def layer(x, state, i, number):
            def attend(q, k, v, scale):  # the layer type's kernel call, chosen by data
                return jax.lax.switch(i, [functools.partial(c, scale=scale) for c in calls], q, k, v)

            attend = calls[0] if len(calls) == 1 else attend
            with layer_scope(number):  # the layer's own number (LoRA dropout masks), as unrolled
                return nnx.merge(graphdef, state)(x, (cos[i], sin[i]), attend)

        run = self._remat(layer)
        rest = state if prefix == 0 else jax.tree.map(lambda a: a[prefix:], state)
        numbers = jnp.arange(prefix, len(layer_types), dtype=jnp.int32)
        x, _ = jax.lax.scan(lambda x, xs: (run(x, *xs), None), x, (rest, index, numbers))
        return x

    def lm_head_weight(self) -> nnx.Param:
        """The LM head [vocab, d]: the tied embedding or the `lm_head` parameter."""
        return self.embedder.embedding if self.config.tie_word_embeddings else self.lm_head

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM-head logits in fp32 (bf16 inputs are multiplied with fp32 accumulation)."""
        logits = linear(hidden, self.lm_head_weight(), preferred_element_type=jnp.float32)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = jnp.tanh(logits / cap) * cap
        return constrain(logits, ("batch", "seq", "vocab"))

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        *,
        segment_ids=None,
        positions=None,
        pixel_values=None,
        image_grid_thw=None,
    ) -> ModelOutput:
        if pixel_values is not None or image_grid_thw is not None:  # as a Qwen3VL is called, but with no tower
            raise ConfigError(
                "this model has no vision tower, so it cannot take images (pixel_values): load a Qwen3-VL "
                "checkpoint that holds one (from_pretrained returns it as Qwen3VL), or pass text only"
            )
        hidden = self.hidden_states(input_ids, attention_mask, segment_ids=segment_ids, positions=positions)
        return ModelOutput(logits=self.logits(hidden), hidden_states=hidden)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _stack_values(values: list):
    first = values[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(values), *first.shape), first.dtype)
    if isinstance(first, np.ndarray):
        return np.stack(values)
    if all(_on_one_cpu(v) for v in values):  # numpy's copy: no program to compile per parameter shape
        return jax.device_put(np.stack([np.asarray(v) for v in values]), first.sharding)
    return jnp.stack(values)


def _on_one_cpu(value) -> bool:
    concrete = isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer)
    devices = value.sharding.device_set if concrete else ()
    return len(devices) == 1 and next(iter(devices)).platform == "cpu"


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
    if model.runtime.scan_layers == scan_layers:
        return model
    graphdef, _ = abstract_model(model.config, model.runtime.replace(scan_layers=scan_layers))
    state = nnx.state(model)
    return nnx.merge(graphdef, stack_layers(state) if scan_layers else unstack_layers(state))


def _stacked(blocks: list[Block]) -> Block:
    """One block holding every block's parameters stacked on a leading `layers` axis."""
    graphdef, _ = nnx.split(blocks[0])
    states = [nnx.split(b)[1] for b in blocks]
    return nnx.merge(graphdef, jax.tree.map(_stack, *states, is_leaf=_is_variable))


@functools.lru_cache(maxsize=16)
def abstract_model(config: ModelConfig, runtime: Runtime = DEFAULT_RUNTIME) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and shape-only state of a model (no memory); cached, since tracing the
    initialisers of a large model takes about a second."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(config, runtime, rngs=nnx.Rngs(0))))
