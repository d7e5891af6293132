"""The fine-tuning tasks' losses, as token-sum losses (`losses.base`): cross-entropy per example
(classification), squared error per example (regression), cross-entropy per labelled token — each word's
first sub-token — (token classification). The model is an encoder with a task head (`models.heads`);
dropout draws from `rng`.

A batch is padded (one text per row) or packed (`train.packed_texts`: `segment_ids` and `positions` too;
sequence tasks then score every text's `labels` [N], weighted by `label_weight` [N] — the texts of this
group of rows —, token tasks score `labels` packed like the tokens). A media batch (a model with towers:
`data.labeled_media`) carries its row-aligned media keys beside the ids, and the model takes them all."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bidirlm_jax.losses.base import Batch, LossFn
from bidirlm_jax.models.encoder import MODEL_INPUTS
from bidirlm_jax.models.heads import IGNORE_INDEX


def _logits(model: nnx.Module, batch: Batch, rng: jax.Array, *, per_text: bool) -> jax.Array:
    ids = ("input_ids", "attention_mask")
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch and k not in ids}  # packed: segment_ids, positions
    packed = {"num_texts": batch["labels"].shape[0]} if per_text and "segment_ids" in batch else {}
    return model(*(batch[k] for k in ids), rng=rng, **inputs, **packed).logits


def _weights(batch: Batch) -> jax.Array:
    """Which examples this batch scores: `label_weight` (packed groups), else all."""
    return jnp.asarray(batch.get("label_weight", jnp.ones(jnp.shape(batch["labels"])[:1])), jnp.float32)


def classification_loss(model: nnx.Module, batch: Batch, rng: jax.Array):
    """Cross-entropy summed over the batch's examples; counts examples; sums correct predictions."""
    logits = _logits(model, batch, rng, per_text=True)
    labels = jnp.asarray(batch["labels"], jnp.int32)
    weight = _weights(batch)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return jnp.sum(losses * weight), jnp.sum(weight), {"accuracy": jnp.sum(correct * weight)}


def regression_loss(model: nnx.Module, batch: Batch, rng: jax.Array):
    """Squared error summed over the batch's examples; counts examples; sums absolute errors."""
    predictions = _logits(model, batch, rng, per_text=True)
    error = predictions - jnp.asarray(batch["labels"], jnp.float32)
    weight = _weights(batch)
    return jnp.sum(error * error * weight), jnp.sum(weight), {"abs_error": jnp.sum(jnp.abs(error) * weight)}


def token_classification_loss(model: nnx.Module, batch: Batch, rng: jax.Array):
    """Cross-entropy summed over labelled tokens (labels != IGNORE_INDEX); counts them; sums correct ones."""
    logits = _logits(model, batch, rng, per_text=False)
    labels = jnp.asarray(batch["labels"], jnp.int32)
    valid = labels != IGNORE_INDEX
    safe = jnp.where(valid, labels, 0)
    weight = valid.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    correct = (jnp.argmax(logits, axis=-1) == safe).astype(jnp.float32)
    return jnp.sum(losses * weight), jnp.sum(weight), {"accuracy": jnp.sum(correct * weight)}


LOSSES: dict[str, LossFn] = {
    "classification": classification_loss,
    "regression": regression_loss,
    "token_classification": token_classification_loss,
}
