"""Qwen3-VL: the text stack fed by the vision tower (transformers' `Qwen3VLModel` + LM head).

`model(input_ids, attention_mask=None, *, pixel_values=None, image_grid_thw=None)` takes what
transformers' Qwen3-VL processor returns (placeholders already expanded: t·h·w/4 `<|image_pad|>` per
image) and returns `.hidden_states` (final-normed) and `.logits`. The host part (`prepare`) checks
the inputs, computes the M-RoPE positions and the patch layout; `hidden_states` is the array part (one
`nnx.jit` away): the tower's tokens replace the placeholders in order (`merge_placeholders`), and the
DeepStack features are added at the image positions after text layers 0…K−1. Bidirectional or causal
as the text config says; without images it is the text model (positions 0…T−1, as transformers does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models import transformer
from bidirlm_jax.models.placeholders import merge_placeholders, valid_first
from bidirlm_jax.models.runtime import DEFAULT_RUNTIME, Runtime
from bidirlm_jax.models.towers.qwen3_vl import vision as tower
from bidirlm_jax.models.towers.qwen3_vl.config import Qwen3VLConfig, VisionConfig
from bidirlm_jax.models.towers.qwen3_vl.layout import VisionLayout, vision_layout
from bidirlm_jax.models.towers.qwen3_vl.rope_index import get_rope_index
from bidirlm_jax.models.towers.qwen3_vl.vision import VisionTower
from bidirlm_jax.models.transformer import ModelOutput, Transformer


class Qwen3VL(nnx.Module):
    """The text stack fed by the vision tower; one `runtime` runs both (the tower ignores the attention mode:
    it always attends within each image)."""

    def __init__(self, config: Qwen3VLConfig, runtime: Runtime = DEFAULT_RUNTIME, *, rngs: nnx.Rngs):
        self.config, self.runtime = config, runtime
        self.text = Transformer(config.text, runtime, rngs=rngs)
        self.visual = VisionTower(config.vision, runtime, rngs=rngs)

    def prepare(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None) -> dict[str, Any]:
        """Host side: check the inputs and compute `positions` [3, B, T] and the patch `layout` (all images
        back to back in one row, as transformers packs them); the keyword arguments of `hidden_states`."""
        ids = np.asarray(input_ids)
        config = self.config
        images = image_inputs(config.vision, config.image_token_id, ids, attention_mask, pixel_values, image_grid_thw)
        return dict(input_ids=ids, attention_mask=attention_mask, **images)

    def hidden_states(
        self,
        input_ids,
        attention_mask=None,
        *,
        positions,
        pixel_values: jax.Array | None = None,
        layout: VisionLayout | None = None,
    ) -> jax.Array:
        """Final-normed hidden states [B, T, d]; `pixel_values` [R, P, patch_dim] with its `layout` (rows of
        images back to back whose valid tokens, in order, are the placeholders' tokens)."""
        ids = jnp.asarray(input_ids)
        x = self.text.embed(ids)
        add = None
        if pixel_values is not None:
            placeholders = ids == self.config.image_token_id
            x, add = merge_images(self.visual, x, placeholders, pixel_values, layout, self.config.text.num_layers)
        return self.text.hidden_states(inputs_embeds=x, attention_mask=attention_mask, positions=positions, add=add)

    def batch_hidden_states(self, inputs: Mapping[str, jax.Array]) -> jax.Array:
        """Hidden states of a row-aligned batch (`data.media.collate`: `positions` [B, 3, T], row b's image in
        `pixel_values[b]` with its `vision_*` layout), the path `models.encoder` takes for every media model."""
        return self.hidden_states(
            inputs["input_ids"],
            inputs.get("attention_mask"),
            positions=jnp.swapaxes(jnp.asarray(inputs["positions"]), 0, 1),
            **batch_images(inputs),
        )

    def __call__(self, input_ids, attention_mask=None, *, pixel_values=None, image_grid_thw=None) -> ModelOutput:
        hidden = self.hidden_states(**self.prepare(input_ids, attention_mask, pixel_values, image_grid_thw))
        return ModelOutput(logits=self.text.logits(hidden), hidden_states=hidden)


def batch_images(inputs: Mapping[str, jax.Array]) -> dict[str, Any]:
    """The `hidden_states` keywords of a row-aligned batch's images: `pixel_values` and the `layout` its
    `vision_*` fields make (nothing when the batch holds no image)."""
    if inputs.get("pixel_values") is None:
        return {}
    layout = VisionLayout(*(inputs[f"vision_{f.name}"] for f in dataclasses.fields(VisionLayout)))
    return dict(pixel_values=inputs["pixel_values"], layout=layout)


def image_inputs(
    vision: VisionConfig, image_token_id: int, ids: np.ndarray, attention_mask, pixel_values, image_grid_thw
) -> dict[str, Any]:
    """Host side of images in a text batch `ids` [B, T]: check that `pixel_values` [patches, patch_dim] and
    `image_grid_thw` come together and that the placeholders count the images' tokens; `positions`
    [3, B, T] (M-RoPE from `get_rope_index`, text positions 0…T−1 without images), `pixel_values`
    [1, patches, patch_dim] and its `layout` (all images back to back in one row)."""
    b, t = ids.shape
    if (pixel_values is None) != (image_grid_thw is None):
        raise ConfigError("pass pixel_values and image_grid_thw together (both from the image processor)")
    if pixel_values is None:
        return {"positions": np.broadcast_to(np.arange(t), (3, b, t))}
    grids = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    pixels = np.asarray(pixel_values)
    patches = int(np.prod(grids, axis=1).sum())
    if pixels.shape != (patches, vision.patch_dim):
        raise ConfigError(
            f"pixel_values of shape {pixels.shape} for image grids {grids.tolist()}: expected ({patches}, "
            f"{vision.patch_dim}), one row per patch as the Qwen3-VL image processor returns them"
        )
    placeholders = int((ids == image_token_id).sum())
    if placeholders != patches // vision.merge_unit:
        raise ConfigError(
            f"input_ids hold {placeholders} image placeholders (id {image_token_id}) but the "
            f"images give {patches // vision.merge_unit} tokens; expand each image's placeholders to t·h·w/"
            f"{vision.merge_unit} as the processor does"
        )
    positions, _ = get_rope_index(
        ids, grids, attention_mask, image_token_id=image_token_id, spatial_merge_size=vision.spatial_merge_size
    )
    layout = vision_layout([grids], merge=vision.spatial_merge_size, side=vision.grid_side)
    return dict(positions=positions, pixel_values=pixels[None], layout=layout)


def merge_images(
    visual: VisionTower, x: jax.Array, placeholders: jax.Array, pixel_values, layout: VisionLayout, text_layers: int
) -> tuple[jax.Array, dict[int, jax.Array]]:
    """`x` [B, T, d] with the tower's tokens of `pixel_values` [R, P, patch_dim] (rows of images back to back
    whose valid tokens, in order, are the placeholders') at the `placeholders` [B, T], and the DeepStack
    additions `{text layer: [B, T, d]}` (zero outside the image positions)."""
    vision = visual(pixel_values, layout)
    valid = jnp.asarray(layout.lengths).sum(axis=1) // visual.config.merge_unit  # tokens per row
    order = valid_first(vision.tokens.shape[:2], valid)
    x = merge_placeholders(x, placeholders, vision.tokens.reshape(-1, x.shape[-1])[order])
    zeros = jnp.zeros_like(x)
    layers = min(vision.deepstack.shape[0], text_layers)  # transformers drops the rest
    add = {
        k: merge_placeholders(zeros, placeholders, vision.deepstack[k].reshape(-1, x.shape[-1])[order])
        for k in range(layers)
    }
    return x, add


def abstract_model(config: Qwen3VLConfig, runtime: Runtime = DEFAULT_RUNTIME) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and shape-only state of a `Qwen3VL` (no memory)."""
    return nnx.split(nnx.eval_shape(lambda: Qwen3VL(config, runtime, rngs=nnx.Rngs(0))))


def relayout(model: Qwen3VL, scan_layers: bool) -> Qwen3VL:
    """`model` with its text layers and tower blocks scanned (stacked) or unrolled (the per-layer layout
    of files), as `transformer.relayout` does for the text model."""
    if model.runtime.scan_layers == scan_layers:
        return model
    text = transformer.relayout(model.text, scan_layers)
    visual = tower.relayout(model.visual, scan_layers)
    graphdef, _ = abstract_model(model.config, model.runtime.replace(scan_layers=scan_layers))
    return nnx.merge(graphdef, nnx.State({"text": nnx.state(text), "visual": nnx.state(visual)}))
