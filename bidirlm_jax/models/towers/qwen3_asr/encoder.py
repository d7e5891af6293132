"""The AuT audio encoder: conv stem, pre-LN transformer layers, `ln_post`, and the projector to the text width.

Input is one clip per row, as transformers' processors give it: log-mel `input_features [B, mel_bins, T]`
and the clip lengths in frames `[B]` (frames past a clip's length are ignored: its tail chunk is
zero-padded, as the released model pads it). Row b's tokens are chunk after chunk, `c` per full chunk,
so its valid tokens are the prefix of `chunk_tokens(lengths[b])` (`audio_tokens`), and the output is
`[B, chunks·c, ...]` with a `valid` mask, static in shape for a given T.

Clips never attend to each other; within a clip attention is a segment mask that every attention kernel
runs: "clip" attends over the whole clip (the released BidirLM-Omni), "window" within blocks of
`window_tokens` tokens from the clip's start (transformers' `cu_seqlens` windows of `n_window_infer`
frames). Layers run unrolled or, with `scan_layers`, as one scanned layer over stacked parameters.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from bidirlm_jax.audio_tokens import conv_len
from bidirlm_jax.kernels.attention import attend
from bidirlm_jax.kernels.masks import MaskSpec, Segments
from bidirlm_jax.models.layers import ACTIVATIONS, LayerNorm, linear, param
from bidirlm_jax.models.runtime import DEFAULT_RUNTIME, Runtime
from bidirlm_jax.models.towers.qwen3_asr.config import AudioConfig
from bidirlm_jax.models.towers.qwen3_asr.stem import ConvStem, chunk_lengths
from bidirlm_jax.models.transformer import stack_layers

FULL = MaskSpec(None, None)  # bidirectional; the segments do the rest


class AudioOutput(NamedTuple):
    tokens: jax.Array  # [B, chunks·c, output_dim]: after the projector, what replaces the audio placeholders
    valid: jax.Array  # [B, chunks·c] bool: real tokens (a prefix of each row)


def token_mask(frames: jax.Array, chunk_tokens: int) -> jax.Array:
    """[B, chunks·c] bool: token j of chunk k is real when j < conv_len(frames[b, k]) (frames [B, chunks])."""
    b, chunks = frames.shape
    return (jnp.arange(chunk_tokens)[None, None, :] < conv_len(frames)[:, :, None]).reshape(b, chunks * chunk_tokens)


def _bias(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype: str) -> nnx.Param:
    return param(rngs, shape, axes, dtype, init="zeros")


class AudioAttention(nnx.Module):
    """Multi-head self-attention with biases on q, k, v and out (heads split out of torch's [out, in])."""

    def __init__(self, config: AudioConfig, dtype: str, *, rngs: nnx.Rngs):
        d, h, hd = config.d_model, config.encoder_attention_heads, config.head_dim
        for name in ("q", "k", "v"):
            setattr(self, f"{name}_proj", param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), dtype))
            setattr(self, f"{name}_bias", _bias(rngs, (h, hd), ("heads", "head_dim"), dtype))
        self.out_proj = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), dtype)
        self.out_bias = _bias(rngs, (d,), ("embed",), dtype)

    def __call__(self, x: jax.Array, attend_fn) -> jax.Array:
        q, k, v = (
            linear(x, getattr(self, f"{n}_proj")) + getattr(self, f"{n}_bias")[...].astype(x.dtype) for n in "qkv"
        )
        return linear(attend_fn(q, k, v), self.out_proj, in_dims=2) + self.out_bias[...].astype(x.dtype)


class AudioLayer(nnx.Module):
    """Pre-LN block: `x += attn(LN(x))`, then `x += fc2(act(fc1(LN(x))))`."""

    def __init__(self, config: AudioConfig, dtype: str, *, rngs: nnx.Rngs):
        d, f = config.d_model, config.encoder_ffn_dim
        norm = dict(eps=config.layer_norm_eps, param_dtype=dtype, rngs=rngs)
        self.act = ACTIVATIONS[config.activation_function]
        self.self_attn_layer_norm = LayerNorm(d, **norm)
        self.self_attn = AudioAttention(config, dtype, rngs=rngs)
        self.final_layer_norm = LayerNorm(d, **norm)
        self.fc1 = param(rngs, (f, d), ("mlp", "embed"), dtype)
        self.fc1_bias = _bias(rngs, (f,), ("mlp",), dtype)
        self.fc2 = param(rngs, (d, f), ("embed", "mlp"), dtype)
        self.fc2_bias = _bias(rngs, (d,), ("embed",), dtype)

    def __call__(self, x: jax.Array, attend_fn) -> jax.Array:
        x = x + self.self_attn(self.self_attn_layer_norm(x), attend_fn)
        h = self.act(linear(self.final_layer_norm(x), self.fc1) + self.fc1_bias[...].astype(x.dtype))
        return x + linear(h, self.fc2) + self.fc2_bias[...].astype(x.dtype)


def _stacked(layers: list[AudioLayer]) -> AudioLayer:
    """One layer holding every layer's parameters stacked on a leading `layers` axis."""
    graphdef, _ = nnx.split(layers[0])
    stacked = stack_layers({"layers": {i: nnx.state(layer) for i, layer in enumerate(layers)}})["layers"]
    return nnx.merge(graphdef, stacked)


class AudioEncoder(nnx.Module):
    """`encoder(input_features [B, mel_bins, T], lengths [B], chunk_ids=None) -> AudioOutput` (see the module
    docstring and `hidden_states`)."""

    def __init__(self, config: AudioConfig, runtime: Runtime = DEFAULT_RUNTIME, *, rngs: nnx.Rngs):
        d, dtype = config.d_model, runtime.param_dtype
        self.config, self.runtime = config, runtime
        self.stem = ConvStem(config, dtype, rngs=rngs)
        layers = [AudioLayer(config, dtype, rngs=rngs) for _ in range(config.encoder_layers)]
        self.layers = _stacked(layers) if runtime.scan_layers else nnx.List(layers)
        self.ln_post = LayerNorm(d, eps=config.layer_norm_eps, param_dtype=dtype, rngs=rngs)
        self.proj1 = param(rngs, (d, d), ("mlp", "embed"), dtype)
        self.proj1_bias = _bias(rngs, (d,), ("mlp",), dtype)
        self.proj2 = param(rngs, (config.output_dim, d), ("embed", "mlp"), dtype)
        self.proj2_bias = _bias(rngs, (config.output_dim,), ("embed",), dtype)

    def hidden_states(self, input_features, lengths, chunk_ids=None) -> tuple[jax.Array, jax.Array]:
        """`ln_post` output [B, chunks·c, d_model] (transformers' `Qwen3ASREncoder.last_hidden_state`) and
        the valid mask [B, chunks·c]. `chunk_ids` [K] (`audio_tokens.chunk_ids`, from the host): only those
        chunks are computed, as transformers packs clips — the stem on them, then the layers over one row of
        their K·c tokens, clip after clip, each clip (or window of it) a segment; the others (no frame:
        invalid tokens either way) come back as zeros."""
        cfg = self.config
        x = jnp.asarray(input_features).astype(self.runtime.dtype)
        lengths = jnp.asarray(lengths, jnp.int32)
        b, mels, t = x.shape
        n, chunks, c = cfg.chunk_frames, -(-t // cfg.chunk_frames), cfg.chunk_tokens
        x = jnp.pad(x, ((0, 0), (0, 0), (0, chunks * n - t)))
        x = jnp.where(jnp.arange(chunks * n)[None, None, :] < lengths[:, None, None], x, 0)  # zero-padded tails
        mel = x.reshape(b, mels, chunks, n).transpose(0, 2, 1, 3).reshape(b * chunks, mels, n)
        frames = chunk_lengths(lengths, chunks, n)  # [B, chunks]
        remask = jnp.where((lengths <= n)[:, None], frames, n).reshape(-1)  # a single-chunk clip is unpadded
        valid = token_mask(frames, c)
        if chunk_ids is None:
            h = self.stem(mel, remask).reshape(b, chunks * c, cfg.d_model)
            if cfg.audio_attention == "clip":
                segments = Segments.of(valid, None, valid.shape)
            else:
                segments = Segments.blocks(valid.shape, cfg.window_tokens, valid)
            return self.ln_post(self._layers(h, segments)), valid
        ids = jnp.asarray(chunk_ids, jnp.int32)  # ids past the end pad the count: gathered clamped, dropped after
        k = ids.shape[0]
        picked = self.stem(jnp.take(mel, ids, axis=0, mode="clip"), jnp.take(remask, ids, mode="clip"))
        real = jnp.take(valid.reshape(b * chunks, c), ids, axis=0, mode="clip") & (ids < b * chunks)[:, None]
        clip, place = ids // chunks, (ids % chunks)[:, None] * c + jnp.arange(c)[None, :]  # clip, token in clip
        window = jnp.zeros_like(place) if cfg.audio_attention == "clip" else place // cfg.window_tokens
        segment = (clip[:, None] * (chunks * c) + window).reshape(1, k * c)  # one per clip (or clip window)
        h = self._layers(
            picked.reshape(1, k * c, cfg.d_model), Segments.of(real.reshape(1, k * c), segment, (1, k * c))
        )
        h = self.ln_post(h).reshape(k, c, cfg.d_model)
        out = jnp.zeros((b * chunks, c, cfg.d_model), h.dtype).at[ids].set(h, mode="drop")
        return out.reshape(b, chunks * c, cfg.d_model), valid

    def _layers(self, h: jax.Array, segments: Segments) -> jax.Array:
        """The transformer layers over `h` [rows, tokens, d_model], attention within `segments`."""
        cfg, run = self.config, self.runtime
        attend_fn = functools.partial(
            attend,
            spec=FULL,
            segments=segments,
            scale=cfg.head_dim**-0.5,
            implementation=run.attention_impl,
            layer_type="audio",
            block_q=run.attention_block_q,
            block_kv=run.attention_block_kv,
        )
        return self._scanned(h, attend_fn) if run.scan_layers else self._unrolled(h, attend_fn)

    def _unrolled(self, x: jax.Array, attend_fn) -> jax.Array:
        for layer in self.layers:
            x = layer(x, attend_fn)
        return x

    def _scanned(self, x: jax.Array, attend_fn) -> jax.Array:
        graphdef, state = nnx.split(self.layers)
        x, _ = jax.lax.scan(lambda x, s: (nnx.merge(graphdef, s)(x, attend_fn), None), x, state)
        return x

    def project(self, hidden: jax.Array) -> jax.Array:
        """`proj2(act(proj1(h)))`: encoder states to the text width (the -hf layout's `multi_modal_projector`)."""
        act = ACTIVATIONS[self.config.activation_function]
        h = act(linear(hidden, self.proj1) + self.proj1_bias[...].astype(hidden.dtype))
        return linear(h, self.proj2) + self.proj2_bias[...].astype(hidden.dtype)

    def __call__(self, input_features, lengths, chunk_ids=None) -> AudioOutput:
        hidden, valid = self.hidden_states(input_features, lengths, chunk_ids)
        return AudioOutput(self.project(hidden), valid)
