"""BidirLM-Omni: the text stack fed by the Qwen3-VL vision tower and the AuT audio tower (the released
`BidirLMOmniModel` + the tied LM head).

`model(input_ids, attention_mask=None, *, pixel_values=None, image_grid_thw=None, input_features=None,
input_features_mask=None)` takes what the Qwen3-VL and Qwen3-ASR processors return (placeholders already
expanded in `input_ids`) and returns `.hidden_states` (final-normed) and `.logits`. Any combination of
modalities runs in one sequence: the audio tokens replace `<|audio_pad|>` first, then the image tokens
`<|image_pad|>`, as the released model orders them; positions are Qwen3-VL's M-RoPE (`get_rope_index`:
audio tokens take text positions, as the release does), and DeepStack features are added at the image
positions only. Text alone gives the text model's result. A tower the config lacks (`OmniConfig.without`)
is not built, and inputs for it are refused.

The host checks and the array work are Qwen3-VL's (`image_inputs`, `merge_images`) and Qwen3-ASR's
(`audio_inputs`, `merge_audio`); `batch_hidden_states` takes the row-aligned media batch of the encoder.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models import transformer
from bidirlm_jax.models.runtime import DEFAULT_RUNTIME, Runtime
from bidirlm_jax.models.towers.omni.config import OmniConfig
from bidirlm_jax.models.towers.qwen3_asr.encoder import AudioEncoder
from bidirlm_jax.models.towers.qwen3_asr.model import audio_inputs, batch_clips, merge_audio
from bidirlm_jax.models.towers.qwen3_vl import vision as vision_tower
from bidirlm_jax.models.towers.qwen3_vl.layout import VisionLayout
from bidirlm_jax.models.towers.qwen3_vl.model import batch_images, image_inputs, merge_images
from bidirlm_jax.models.towers.qwen3_vl.vision import VisionTower
from bidirlm_jax.models.transformer import ModelOutput, Transformer


class Omni(nnx.Module):
    """The text stack with whichever towers the config holds; one `runtime` runs all three (the towers keep
    their own attention patterns)."""

    def __init__(self, config: OmniConfig, runtime: Runtime = DEFAULT_RUNTIME, *, rngs: nnx.Rngs):
        self.config, self.runtime = config, runtime
        self.text = Transformer(config.text, runtime, rngs=rngs)
        self.visual = None if config.vision is None else VisionTower(config.vision, runtime, rngs=rngs)
        self.audio_tower = None if config.audio is None else AudioEncoder(config.audio, runtime, rngs=rngs)

    def _require(self, tower: str, given: bool) -> None:
        if given and getattr(self.config, tower) is None:
            raise ConfigError(
                f"this Omni model was built without its {tower} tower (loaded with {tower}=False, or its "
                f"checkpoint holds none): it cannot take {'images' if tower == 'vision' else 'audio'}; load it "
                f"with the {tower} tower or drop those inputs"
            )

    def prepare(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        input_features=None,
        input_features_mask=None,
    ) -> dict[str, Any]:
        """Host side: check the inputs and compute `positions` [3, B, T], the patch `layout` and the clips'
        `lengths`; the keyword arguments of `hidden_states`."""
        cfg = self.config
        ids = np.asarray(input_ids)
        self._require("vision", pixel_values is not None or image_grid_thw is not None)
        self._require("audio", input_features is not None or input_features_mask is not None)
        if cfg.vision is None:
            b, t = ids.shape
            images: dict[str, Any] = {"positions": np.broadcast_to(np.arange(t), (3, b, t))}
        else:
            images = image_inputs(cfg.vision, cfg.image_token_id, ids, attention_mask, pixel_values, image_grid_thw)
        clips = {}
        if cfg.audio is not None:
            clips = audio_inputs(cfg.audio, cfg.audio_token_id, ids, input_features, input_features_mask)
        return dict(input_ids=ids, attention_mask=attention_mask, **images, **clips)

    def hidden_states(
        self,
        input_ids,
        attention_mask=None,
        *,
        positions=None,
        pixel_values: jax.Array | None = None,
        layout: VisionLayout | None = None,
        input_features: jax.Array | None = None,
        lengths: jax.Array | None = None,
        counts: jax.Array | None = None,
        chunk_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Final-normed hidden states [B, T, d]: `input_features` [R, mel_bins, frames] with `lengths` [R]
        (clips whose first `counts` tokens, default all, clip after clip, are the audio placeholders'; the stem
        on `chunk_ids` only, when given), `pixel_values` [R, P, patch_dim] with its `layout` (rows of images
        whose valid tokens, in order, are the image placeholders'), `positions` [3, B, T] (default: text
        positions)."""
        cfg = self.config
        self._require("vision", pixel_values is not None)
        self._require("audio", input_features is not None)
        ids = jnp.asarray(input_ids)
        x = self.text.embed(ids)
        if input_features is not None:
            placeholders = ids == cfg.audio_token_id
            x = merge_audio(self.audio_tower, x, placeholders, input_features, lengths, counts, chunk_ids)
        add = None
        if pixel_values is not None:
            x, add = merge_images(self.visual, x, ids == cfg.image_token_id, pixel_values, layout, cfg.text.num_layers)
        return self.text.hidden_states(inputs_embeds=x, attention_mask=attention_mask, positions=positions, add=add)

    def batch_hidden_states(self, inputs: Mapping[str, jax.Array]) -> jax.Array:
        """`hidden_states` of a row-aligned media batch (each row one item: text, text+image(s), text+audio,
        text+audio+image; `positions` [B, 3, T]; the vision keys with one row of patches per batch row, the
        audio keys with one clip per row, length 0 where a row has none)."""
        positions = inputs.get("positions")  # absent for a model without a vision tower: text positions
        if positions is not None:
            positions = jnp.swapaxes(jnp.asarray(positions), 0, 1)
        media = {**batch_clips(inputs, self.config.audio_token_id), **batch_images(inputs)}
        return self.hidden_states(inputs["input_ids"], inputs.get("attention_mask"), positions=positions, **media)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        *,
        pixel_values=None,
        image_grid_thw=None,
        input_features=None,
        input_features_mask=None,
    ) -> ModelOutput:
        media = dict(pixel_values=pixel_values, image_grid_thw=image_grid_thw)
        media.update(input_features=input_features, input_features_mask=input_features_mask)
        hidden = self.hidden_states(**self.prepare(input_ids, attention_mask, **media))
        return ModelOutput(logits=self.text.logits(hidden), hidden_states=hidden)


def abstract_model(config: OmniConfig, runtime: Runtime = DEFAULT_RUNTIME) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and shape-only state of an `Omni` (no memory)."""
    return nnx.split(nnx.eval_shape(lambda: Omni(config, runtime, rngs=nnx.Rngs(0))))


def relayout(model: Omni, scan_layers: bool) -> Omni:
    """`model` with its text layers and both towers' layers scanned (stacked) or unrolled (the per-layer
    layout of files), as `transformer.relayout` does for the text model."""
    if model.runtime.scan_layers == scan_layers:
        return model
    state: dict[str, Any] = {"text": nnx.state(transformer.relayout(model.text, scan_layers))}
    if model.visual is not None:
        state["visual"] = nnx.state(vision_tower.relayout(model.visual, scan_layers))
    if model.audio_tower is not None:
        audio = nnx.state(model.audio_tower)
        state["audio_tower"] = transformer.stack_layers(audio) if scan_layers else transformer.unstack_layers(audio)
    graphdef, _ = abstract_model(model.config, model.runtime.replace(scan_layers=scan_layers))
    return nnx.merge(graphdef, nnx.State(state))
