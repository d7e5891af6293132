"""The contract of a token-sum loss, which the engine's gradient strategy (`train.objectives.base.token_sum_grads`)
and the evaluations share: sums over items, never means, so that micro-batches and devices add up exactly."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
from flax import nnx

Batch = Mapping[str, jax.Array]
# loss_fn(model, batch, rng) -> (sum of per-item losses, item count, metric sums over the same items)
LossFn = Callable[[nnx.Module, Batch, jax.Array], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]
