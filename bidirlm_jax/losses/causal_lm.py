"""Next-token cross-entropy (causal language modelling), as a token-sum loss (`losses.base`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bidirlm_jax.losses.base import Batch


def causal_lm_loss(
    model: nnx.Module, batch: Batch, rng: jax.Array
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Next-token cross-entropy in fp32. `batch`: `input_ids` [B, T] and optionally `attention_mask`,
    `segment_ids`, `positions`; a target is scored only when it and its context token are real tokens
    of the same segment."""
    del rng
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    segments = batch.get("segment_ids")
    hidden = model.hidden_states(ids, mask, segment_ids=segments, positions=batch.get("positions"))
    logits = model.logits(hidden[:, :-1]).astype(jnp.float32)  # the last position predicts nothing
    targets = ids[:, 1:]
    weight = jnp.ones(targets.shape, jnp.float32)
    if mask is not None:
        weight = weight * (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
    if segments is not None:
        weight = weight * (segments[:, 1:] == segments[:, :-1]).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(losses * weight), jnp.sum(weight), {"accuracy": jnp.sum(correct * weight)}
