"""Qwen3-ASR: the text stack fed by the AuT audio tower (transformers' `Qwen3ASRModel` + LM head).

`model(input_ids, attention_mask=None, *, input_features=None, input_features_mask=None)` takes what
transformers' Qwen3-ASR processor returns (placeholders already expanded: one `<|audio_pad|>` per audio
token) and returns `.hidden_states` (final-normed) and `.logits`. The host part (`prepare`) checks that
the placeholders count the clips' tokens; `hidden_states` is the array part (one `nnx.jit` away): the
tower's tokens replace the placeholders in order. A clip's placeholders are every token the tower makes
(transformers' processor) or, as BidirLM-Omni's released processor counts them, the whole-clip formula
(`audio_tokens.release_tokens`), which keeps the clip's first tokens and drops the rest (logged, counted). Audio tokens take text positions 0…T−1, as
transformers' Qwen3 text model gives them (Qwen3-ASR's M-RoPE sections, where a checkpoint declares them,
see three equal rows: plain RoPE). Bidirectional or causal as the text config says.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bidirlm_jax.audio_tokens import chunk_ids, chunk_tokens, release_tokens
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models import transformer
from bidirlm_jax.models.placeholders import merge_placeholders, valid_first
from bidirlm_jax.models.runtime import DEFAULT_RUNTIME, Runtime
from bidirlm_jax.models.towers.qwen3_asr.config import AudioConfig, Qwen3ASRConfig
from bidirlm_jax.models.towers.qwen3_asr.encoder import AudioEncoder
from bidirlm_jax.models.transformer import ModelOutput, Transformer

log = logging.getLogger(__name__)


class Qwen3ASR(nnx.Module):
    """The text stack fed by the AuT encoder; one `runtime` runs both (the tower keeps its own attention
    pattern, `AudioConfig.audio_attention`)."""

    def __init__(self, config: Qwen3ASRConfig, runtime: Runtime = DEFAULT_RUNTIME, *, rngs: nnx.Rngs):
        self.config, self.runtime = config, runtime
        self.text = Transformer(config.text, runtime, rngs=rngs)
        self.audio_tower = AudioEncoder(config.audio, runtime, rngs=rngs)

    def prepare(self, input_ids, attention_mask=None, input_features=None, input_features_mask=None) -> dict[str, Any]:
        """Host side: check the inputs and compute each clip's length in frames; the keyword arguments of
        `hidden_states`."""
        ids = np.asarray(input_ids)
        config = self.config
        clips = audio_inputs(config.audio, config.audio_token_id, ids, input_features, input_features_mask)
        return dict(input_ids=ids, attention_mask=attention_mask, **clips)

    def hidden_states(
        self, input_ids, attention_mask=None, *, input_features=None, lengths=None, counts=None, chunk_ids=None
    ) -> jax.Array:
        """Final-normed hidden states [B, T, d]; `input_features` [clips, mel_bins, frames] with each clip's
        `lengths` in frames, whose first `counts` tokens (default: all), clip after clip, are the placeholders';
        `chunk_ids`: the chunks that hold frames (`prepare` gives them; default: every chunk)."""
        ids = jnp.asarray(input_ids)
        x = self.text.embed(ids)
        if input_features is not None:
            placeholders = ids == self.config.audio_token_id
            x = merge_audio(self.audio_tower, x, placeholders, input_features, lengths, counts, chunk_ids)
        return self.text.hidden_states(inputs_embeds=x, attention_mask=attention_mask)

    def batch_hidden_states(self, inputs: Mapping[str, jax.Array]) -> jax.Array:
        """Hidden states of a row-aligned batch (`data.media.collate`: row b's clip in `input_features[b]`,
        `audio_lengths[b]` frames, 0 without one), the path `models.encoder` takes for every media model."""
        clips = batch_clips(inputs, self.config.audio_token_id)
        return self.hidden_states(inputs["input_ids"], inputs.get("attention_mask"), **clips)

    def __call__(self, input_ids, attention_mask=None, *, input_features=None, input_features_mask=None) -> ModelOutput:
        hidden = self.hidden_states(**self.prepare(input_ids, attention_mask, input_features, input_features_mask))
        return ModelOutput(logits=self.text.logits(hidden), hidden_states=hidden)


def batch_clips(inputs: Mapping[str, jax.Array], audio_token_id: int) -> dict[str, Any]:
    """The `hidden_states` keywords of a row-aligned batch's clips: `input_features`, their `lengths`
    (`audio_lengths`) and `counts`, the placeholders of each row (nothing when the batch holds no clip)."""
    if inputs.get("input_features") is None:
        return {}
    counts = (jnp.asarray(inputs["input_ids"]) == audio_token_id).sum(axis=-1)
    return dict(input_features=inputs["input_features"], lengths=inputs["audio_lengths"], counts=counts)


def audio_inputs(
    audio: AudioConfig, audio_token_id: int, ids: np.ndarray, input_features, input_features_mask
) -> dict[str, Any]:
    """Host side of audio clips in a text batch `ids` [B, T]: check `input_features` [clips, mel_bins, frames]
    and its prefix mask, and that the placeholders count the clips' tokens; `input_features` and each
    clip's `lengths` in frames (nothing without clips)."""
    if input_features is None:
        if input_features_mask is not None:
            raise ConfigError("input_features_mask without input_features: pass both, as the processor returns them")
        return {}
    features = np.asarray(input_features)
    mels = audio.num_mel_bins
    if features.ndim != 3 or features.shape[1] != mels:
        raise ConfigError(
            f"input_features of shape {features.shape}: expected [clips, {mels}, frames], log-mel features "
            "as the Qwen3-ASR processor returns them"
        )
    if input_features_mask is None:
        lengths = np.full(features.shape[0], features.shape[2])
    else:
        mask = np.asarray(input_features_mask).astype(bool)
        lengths = mask.sum(-1)
        if mask.shape != (features.shape[0], features.shape[2]) or (mask != _prefixes(lengths, mask.shape[1])).any():
            raise ConfigError(
                f"input_features_mask of shape {mask.shape} must mark a prefix of each clip's "
                f"{features.shape[2]} frames (shape {(features.shape[0], features.shape[2])})"
            )
    placeholders = int((ids == audio_token_id).sum())
    made = chunk_tokens(lengths, audio.n_window)
    release = np.minimum(release_tokens(lengths), made)
    if placeholders == made.sum():
        counts = made
    elif placeholders == release.sum():
        counts = release
        log.warning(
            "audio placeholders counted by the whole-clip formula (BidirLM-Omni's processor): each clip keeps "
            "its first tokens, %d of %d tokens dropped",
            made.sum() - release.sum(),
            made.sum(),
        )
    else:
        raise ConfigError(
            f"input_ids hold {placeholders} audio placeholders (id {audio_token_id}) but the clips "
            f"give {made.sum()} tokens ({release.sum()} by the released whole-clip formula); expand each clip's "
            f"placeholders to its token count (audio_tokens.chunk_tokens with n_window {audio.n_window}) as the "
            "processor does"
        )
    chunks = chunk_ids(lengths, features.shape[2], audio.chunk_frames)  # a padded clip's empty chunks skip the stem
    return dict(input_features=features, lengths=lengths, counts=counts, chunk_ids=chunks)


def merge_audio(
    tower: AudioEncoder, x: jax.Array, placeholders: jax.Array, input_features, lengths, counts=None, chunk_ids=None
) -> jax.Array:
    """`x` [B, T, d] with the tower's tokens of the clips `input_features` [R, mel_bins, frames] (`lengths`
    [R] frames; 0: no clip) at the `placeholders` [B, T], clip after clip: each clip's first `counts` [R]
    tokens (default: all it makes); `chunk_ids` as `AudioEncoder.hidden_states` takes them."""
    audio = tower(input_features, lengths, chunk_ids)
    made = audio.valid.sum(axis=1)
    keep = made if counts is None else jnp.minimum(jnp.asarray(counts), made)
    order = valid_first(audio.tokens.shape[:2], keep)
    return merge_placeholders(x, placeholders, audio.tokens.reshape(-1, x.shape[-1])[order])


def _prefixes(lengths: np.ndarray, frames: int) -> np.ndarray:
    return np.arange(frames)[None, :] < lengths[:, None]


def abstract_model(config: Qwen3ASRConfig, runtime: Runtime = DEFAULT_RUNTIME) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and shape-only state of a `Qwen3ASR` (no memory)."""
    return nnx.split(nnx.eval_shape(lambda: Qwen3ASR(config, runtime, rngs=nnx.Rngs(0))))


def relayout(model: Qwen3ASR, scan_layers: bool) -> Qwen3ASR:
    """`model` with its text and audio layers scanned (stacked) or unrolled (the per-layer layout of files),
    as `transformer.relayout` does for the text model; arrays are restacked."""
    if model.runtime.scan_layers == scan_layers:
        return model
    audio = nnx.state(model.audio_tower)
    audio = transformer.stack_layers(audio) if scan_layers else transformer.unstack_layers(audio)
    text = transformer.relayout(model.text, scan_layers)
    graphdef, _ = abstract_model(model.config, model.runtime.replace(scan_layers=scan_layers))
    return nnx.merge(graphdef, nnx.State({"text": nnx.state(text), "audio_tower": audio}))
