"""Training objectives, pluggable into the engine by name (`config.objective`).

An objective is `loss_fn(model, batch, rng) -> (loss_sum, token_count, metrics)`: the *sum* of the
per-token losses, the number of tokens it covers, and metric *sums* over the same tokens. Returning sums
lets the step average exactly by tokens across micro-batches and devices (a mean of means would weight
a short micro-batch like a long one); the engine divides everything by the total count. `rng` is a
fresh key per micro-batch for objectives that sample (masking, dropout); deterministic ones ignore it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bidirlm_jax.errors import ConfigError

Batch = Mapping[str, jax.Array]
LossFn = Callable[[nnx.Module, Batch, jax.Array], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


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
    hidden = model.encode(ids, mask, segment_ids=segments, positions=batch.get("positions"))
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


LOSSES: dict[str, LossFn] = {"causal_lm": causal_lm_loss}


def get_loss(name: str) -> LossFn:
    """The objective registered under `name` (later objectives add themselves to `LOSSES`)."""
    if name not in LOSSES:
        raise ConfigError(f"objective {name!r} is not one of {sorted(LOSSES)}; fix --config.objective")
    return LOSSES[name]
