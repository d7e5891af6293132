"""The audio tower's weights: the key table between transformers' `audio_tower.*` tensors and our
`AudioEncoder` parameters, and a loader from a `{key: array}` mapping.

Our parameters keep torch's `[out, in]` order (conv kernels OIHW), with attention heads split out, so
every entry is a reshape. Keys are relative to the tower: the original Qwen3-ASR prefix is
`thinker.audio_tower.`, BidirLM-Omni's `audio_tower.`, transformers' Qwen3-ASR-hf `model.audio_tower.`
(whose projector lives outside the tower, as `multi_modal_projector.linear_{1,2}`).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from bidirlm_jax.errors import CheckpointError
from bidirlm_jax.models.towers.qwen3_asr.encoder import AudioEncoder

# (tower key, our path); a `{i}` in both is a layer index. Our shapes come from the model.
TOWER_KEYS: tuple[tuple[str, str], ...] = (
    ("conv2d1.weight", "stem.conv2d1.weight"),
    ("conv2d1.bias", "stem.conv2d1.bias"),
    ("conv2d2.weight", "stem.conv2d2.weight"),
    ("conv2d2.bias", "stem.conv2d2.bias"),
    ("conv2d3.weight", "stem.conv2d3.weight"),
    ("conv2d3.bias", "stem.conv2d3.bias"),
    ("conv_out.weight", "stem.conv_out"),
    ("ln_post.weight", "ln_post.weight"),
    ("ln_post.bias", "ln_post.bias"),
    ("proj1.weight", "proj1"),
    ("proj1.bias", "proj1_bias"),
    ("proj2.weight", "proj2"),
    ("proj2.bias", "proj2_bias"),
)
LAYER_KEYS: tuple[tuple[str, str], ...] = tuple(
    [(f"self_attn.{n}_proj.weight", f"self_attn.{n}_proj") for n in ("q", "k", "v", "out")]
    + [(f"self_attn.{n}_proj.bias", f"self_attn.{n}_bias") for n in ("q", "k", "v", "out")]
    + [
        (f"{norm}.{w}", f"{norm}.{w}")
        for norm in ("self_attn_layer_norm", "final_layer_norm")
        for w in ("weight", "bias")
    ]
    + [(f"{fc}.{w}", fc + ("_bias" if w == "bias" else "")) for fc in ("fc1", "fc2") for w in ("weight", "bias")]
)


def _variable(module: nnx.Module, path: str) -> nnx.Variable:
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def load_audio_tower(encoder: AudioEncoder, tensors: Mapping[str, np.ndarray], prefix: str = "audio_tower.") -> None:
    """Set every parameter of `encoder` from `tensors[prefix + key]` (in place); the scanned layout
    stacks the per-layer tensors. A missing key or a shape that does not reshape to ours is an error."""

    def fetch(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if prefix + key not in tensors:
            raise CheckpointError(f"audio tower tensor {prefix + key!r} is missing; is this an audio checkpoint?")
        array = np.asarray(tensors[prefix + key])
        if array.size != int(np.prod(shape)):
            raise CheckpointError(f"{prefix + key}: shape {array.shape} does not fit the audio config's {shape}")
        return array.reshape(shape)

    for key, path in TOWER_KEYS:
        var = _variable(encoder, path)
        var[...] = jnp.asarray(fetch(key, var.shape), var.dtype)
    n = encoder.config.encoder_layers
    for key, path in LAYER_KEYS:
        if encoder.config.scan_layers:
            var = _variable(encoder.layers, path)
            var[...] = jnp.asarray(np.stack([fetch(f"layers.{i}.{key}", var.shape[1:]) for i in range(n)]), var.dtype)
        else:
            for i in range(n):
                var = _variable(encoder.layers[i], path)
                var[...] = jnp.asarray(fetch(f"layers.{i}.{key}", var.shape), var.dtype)
