"""Qwen3-VL's vision tower (transformers' `Qwen3VLVisionModel`) over rows of images back to back.

patch rows → linear patch embedding (the Conv3d whose kernel equals its stride) + the learned position
table resampled to each image's grid → `depth` pre-LayerNorm blocks (attention within each frame of each
image, 2-D rotary embedding applied in fp32, GELU-tanh MLP) → the 2 × 2 merger to the text width. After
the blocks named in `deepstack_visual_indexes` a DeepStack merger (LayerNorm after the 2 × 2 shuffle)
turns the hidden states into text-width features that the text model adds after its first layers.
Mergers use the exact GELU, the blocks the tanh one, as transformers does.

Shapes are static: a row of P patches (P a multiple of 4) gives P/4 tokens; which patches are real and
where each image starts is the host's `VisionLayout`. With the runtime's `scan_layers` the blocks run as scans over
stacked parameters, split at the DeepStack taps.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bidirlm_jax.kernels.attention import attend
from bidirlm_jax.kernels.masks import MaskSpec, Segments
from bidirlm_jax.models.layers import ACTIVATIONS, LayerNorm, linear, param
from bidirlm_jax.models.positions import apply_rope
from bidirlm_jax.models.runtime import DEFAULT_RUNTIME, Runtime
from bidirlm_jax.models.towers.qwen3_vl.config import LAYER_NORM_EPS, VisionConfig
from bidirlm_jax.models.towers.qwen3_vl.layout import VisionLayout
from bidirlm_jax.models.transformer import stack_layers, unstack_layers

BIDIRECTIONAL = MaskSpec(None, None)


@jax.tree_util.register_dataclass
@dataclass
class VisionOutput:
    last_hidden_state: jax.Array  # [B, P, hidden_size] after the last block
    tokens: jax.Array  # [B, P/4, out_hidden_size]: the merged image tokens (transformers' pooler_output)
    deepstack: jax.Array  # [K, B, P/4, out_hidden_size]: one feature per DeepStack merger that ran


class Dense(nnx.Module):
    """`x @ Wᵀ + b` with W stored `[*out, *in]` as transformers stores it (see `layers.linear`)."""

    def __init__(self, out: Sequence[int], inp: Sequence[int], axes: Sequence[str], param_dtype: str, rngs: nnx.Rngs):
        self.in_dims = len(inp)
        self.weight = param(rngs, (*out, *inp), axes, param_dtype)
        self.bias = param(rngs, tuple(out), axes[: len(out)], param_dtype, init="zeros")

    def __call__(self, x: jax.Array) -> jax.Array:
        return linear(x, self.weight, in_dims=self.in_dims) + self.bias[...].astype(x.dtype)


def rotary_tables(coords: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """fp32 cos/sin [B, P, head_dim] of 2-D rotary embedding: the first half of each rotated pair's
    frequencies turns with the patch row, the second with its column (transformers' axial RoPE)."""
    quarter = head_dim // 2
    inv_freq = 1.0 / (theta ** (np.arange(0, quarter, 2, dtype=np.float32) / np.float32(quarter)))
    freqs = jnp.asarray(coords).astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    freqs = freqs.reshape(*freqs.shape[:-2], -1)  # [B, P, head_dim/2]: row frequencies | column frequencies
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


class VisionAttention(nnx.Module):
    """Multi-head self-attention with one fused qkv projection (rows [q; k; v], each head-major)."""

    def __init__(self, config: VisionConfig, param_dtype: str, *, rngs: nnx.Rngs):
        d, h, hd = config.hidden_size, config.num_heads, config.head_dim
        self.qkv = Dense((3, h, hd), (d,), ("qkv", "heads", "head_dim", "embed"), param_dtype, rngs)
        self.proj = Dense((d,), (h, hd), ("embed", "heads", "head_dim"), param_dtype, rngs)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], attend_fn) -> jax.Array:
        qkv = self.qkv(x)  # [B, P, 3, H, hd]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = (apply_rope(a.astype(jnp.float32), *rope).astype(x.dtype) for a in (q, k))
        return self.proj(attend_fn(q, k, v))


class VisionBlock(nnx.Module):
    def __init__(self, config: VisionConfig, dtype: str, *, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.act = ACTIVATIONS[config.hidden_act]
        self.norm1 = LayerNorm(d, eps=LAYER_NORM_EPS, param_dtype=dtype, rngs=rngs)
        self.attn = VisionAttention(config, dtype, rngs=rngs)
        self.norm2 = LayerNorm(d, eps=LAYER_NORM_EPS, param_dtype=dtype, rngs=rngs)
        self.fc1 = Dense((f,), (d,), ("mlp", "embed"), dtype, rngs)
        self.fc2 = Dense((d,), (f,), ("embed", "mlp"), dtype, rngs)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], attend_fn) -> jax.Array:
        x = x + self.attn(self.norm1(x), rope, attend_fn)
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class PatchMerger(nnx.Module):
    """Each 2 × 2 block of patches → one token of the text width: LayerNorm (per patch, or after the
    shuffle for DeepStack's `postshuffle`), fc1, exact GELU, fc2."""

    def __init__(self, config: VisionConfig, dtype: str, *, postshuffle: bool, rngs: nnx.Rngs):
        wide = config.hidden_size * config.merge_unit
        self.wide, self.postshuffle = wide, postshuffle
        norm_dim = wide if postshuffle else config.hidden_size
        self.norm = LayerNorm(norm_dim, eps=LAYER_NORM_EPS, param_dtype=dtype, rngs=rngs)
        self.fc1 = Dense((wide,), (wide,), ("mlp", "embed"), dtype, rngs)
        self.fc2 = Dense((config.out_hidden_size,), (wide,), ("embed", "mlp"), dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b = x.shape[0]
        x = self.norm(x.reshape(b, -1, self.wide)) if self.postshuffle else self.norm(x).reshape(b, -1, self.wide)
        return self.fc2(ACTIVATIONS["gelu"](self.fc1(x)))


class VisionTower(nnx.Module):
    """`tower(pixels [B, P, patch_dim], layout) -> VisionOutput`; `layout` from `layout.vision_layout`."""

    def __init__(self, config: VisionConfig, runtime: Runtime = DEFAULT_RUNTIME, *, rngs: nnx.Rngs):
        self.config, self.runtime = config, runtime
        d, dtype = config.hidden_size, runtime.param_dtype
        self.patch_embed = Dense((d,), (config.patch_dim,), ("embed", "patch"), dtype, rngs)
        self.pos_embed = param(rngs, (config.num_position_embeddings, d), ("positions", "embed"), dtype)
        blocks = [VisionBlock(config, dtype, rngs=rngs) for _ in range(config.depth)]
        self.layers = _stacked(blocks) if runtime.scan_layers else nnx.List(blocks)
        self.merger = PatchMerger(config, dtype, postshuffle=False, rngs=rngs)
        # Every declared merger is built (and carried through conversion), including those past the depth.
        mergers = [PatchMerger(config, dtype, postshuffle=True, rngs=rngs) for _ in config.deepstack_visual_indexes]
        self.deepstack_mergers = nnx.List(mergers)

    def embed(self, pixels: jax.Array, layout: VisionLayout) -> jax.Array:
        """Patch embeddings plus the position table interpolated to each image (taps summed in fp32)."""
        dtype = jnp.dtype(self.runtime.dtype)
        x = self.patch_embed(jnp.asarray(pixels).astype(dtype))
        taps = jnp.take(self.pos_embed[...], jnp.asarray(layout.interp_index), axis=0).astype(jnp.float32)
        pos = jnp.einsum("bpkd,bpk->bpd", taps, jnp.asarray(layout.interp_weight, jnp.float32))
        return x + pos.astype(dtype)

    def __call__(self, pixels: jax.Array, layout: VisionLayout) -> VisionOutput:
        cfg = self.config
        x = self.embed(pixels, layout)
        rope = rotary_tables(layout.coords, cfg.head_dim, cfg.rope_theta)
        x, features = self._blocks(x, rope, self.attend_fn(layout, x.shape[1]))
        tokens = self.merger(x)
        deepstack = jnp.stack(features) if features else jnp.zeros((0, *tokens.shape), tokens.dtype)
        return VisionOutput(last_hidden_state=x, tokens=tokens, deepstack=deepstack)

    def attend_fn(self, layout: VisionLayout, length: int):
        """The blocks' attention kernel call: full attention within each segment (frame) of each row."""
        run = self.runtime
        segments = Segments.per_item(layout.lengths, length)
        return functools.partial(
            attend,
            spec=BIDIRECTIONAL,
            segments=segments,
            scale=self.config.head_dim**-0.5,
            implementation=run.attention_impl,
            layer_type="vision",
            block_q=run.attention_block_q,
            block_kv=run.attention_block_kv,
        )

    def _blocks(self, x, rope, attend_fn) -> tuple[jax.Array, list[jax.Array]]:
        """The blocks over `x`, and the DeepStack feature of each tap in block order. Scanned, one scan
        runs from each tap to the next (a tap's hidden states must leave the scan)."""
        cfg = self.config
        taps, features = dict(cfg.taps), []
        if not self.runtime.scan_layers:
            for i, block in enumerate(self.layers):
                x = block(x, rope, attend_fn)
                if i in taps:
                    features.append(self.deepstack_mergers[taps[i]](x))
            return x, features
        graphdef, state = nnx.split(self.layers)
        start = 0
        for stop in sorted({*(b + 1 for b in taps), cfg.depth}):
            part = jax.tree.map(lambda a, start=start, stop=stop: a[start:stop], state)
            x, _ = jax.lax.scan(lambda x, s: (nnx.merge(graphdef, s)(x, rope, attend_fn), None), x, part)
            if stop - 1 in taps:
                features.append(self.deepstack_mergers[taps[stop - 1]](x))
            start = stop
        return x, features


def _stacked(blocks: list[VisionBlock]) -> VisionBlock:
    """One block holding every block's parameters stacked on a leading `layers` axis."""
    graphdef, _ = nnx.split(blocks[0])
    per_layer = {i: nnx.state(block) for i, block in enumerate(blocks)}
    return nnx.merge(graphdef, stack_layers({"layers": per_layer})["layers"])


def relayout(tower: VisionTower, scan_layers: bool) -> VisionTower:
    """`tower` with its blocks scanned (stacked parameters) or unrolled (the per-block layout of files)."""
    if tower.runtime.scan_layers == scan_layers:
        return tower
    runtime = tower.runtime.replace(scan_layers=scan_layers)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: VisionTower(tower.config, runtime, rngs=nnx.Rngs(0))))
    state = nnx.state(tower)
    return nnx.merge(graphdef, stack_layers(state) if scan_layers else unstack_layers(state))
