"""The fine-tuning tasks' losses, as token-sum losses (`losses.base`): cross-entropy per example
(classification), squared error per example (regression), cross-entropy per labelled token — each word's
first sub-token — (token classification). The model is an encoder with a task head (`models.heads`);
dropout draws from `rng`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bidirlm_jax.losses.base import Batch, LossFn
from bidirlm_jax.models.heads import IGNORE_INDEX


def classification_loss(model: nnx.Module, batch: Batch, rng: jax.Array):
    """Cross-entropy summed over the batch's examples; counts examples; sums correct predictions."""
    logits = model(batch["input_ids"], batch["attention_mask"], rng=rng).logits
    labels = jnp.asarray(batch["labels"], jnp.int32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return jnp.sum(losses), jnp.asarray(labels.shape[0], jnp.float32), {"accuracy": jnp.sum(correct)}


def regression_loss(model: nnx.Module, batch: Batch, rng: jax.Array):
    """Squared error summed over the batch's examples; counts examples; sums absolute errors."""
    predictions = model(batch["input_ids"], batch["attention_mask"], rng=rng).logits
    error = predictions - jnp.asarray(batch["labels"], jnp.float32)
    return jnp.sum(error * error), jnp.asarray(error.shape[0], jnp.float32), {"abs_error": jnp.sum(jnp.abs(error))}


def token_classification_loss(model: nnx.Module, batch: Batch, rng: jax.Array):
    """Cross-entropy summed over labelled tokens (labels != IGNORE_INDEX); counts them; sums correct ones."""
    logits = model(batch["input_ids"], batch["attention_mask"], rng=rng).logits
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
