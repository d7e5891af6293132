"""One optimizer step: the objective's gradient, clip, AdamW; jitted on a mesh with donated state.

How a batch becomes a loss and a gradient (token sums over micro-batches, GradCache, ...) is the
objective's business (`objectives.base.GradFn`); the step only applies the update and reports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import bidirlm_jax.train.trainable as trainable_lib
from bidirlm_jax import sharding
from bidirlm_jax.train.objectives.base import Batch, GradFn
from bidirlm_jax.train.state import TrainState

StepFn = Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]


def make_step_fn(
    graphdef: nnx.GraphDef,
    grad_fn: GradFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    skip_nonfinite: bool = False,
    trainable: trainable_lib.Filter = nnx.Param,
) -> StepFn:
    """The pure step function `(state, batch) -> (state, metrics)`; see `jit_step` for the compiled one.

    Metrics: `loss` (the objective's mean), `grad_norm` (before clipping), `learning_rate` (the one
    applied), `tokens` (the items the loss covers), `finite` (1.0 when loss and gradients were finite)
    and the objective's own metrics. With `skip_nonfinite`, a non-finite step leaves params and optimizer state
    untouched (the step counter and RNG still advance, so the data stays in sync). Only the `trainable`
    parameters (`optim.trainable` / `optim.frozen`) are clipped, updated and counted in `grad_norm`; the other gradients are
    dropped here, so the compiled step never computes what would only feed them.
    """

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng, step_rng = jax.random.split(state.rng)
        loss, grads, count, metrics = grad_fn(graphdef, state.params, batch, step_rng)
        grads, _ = trainable_lib.split(grads, trainable)
        train_params, frozen = trainable_lib.split(state.params, trainable)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, train_params)
        params = nnx.merge_state(optax.apply_updates(train_params, updates), frozen)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_nonfinite:
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
            params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        out = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state.step),
            "tokens": count,
            "finite": finite.astype(jnp.float32),
            **metrics,
        }
        return new_state, out

    return step


def jit_step(step: StepFn, state_shardings: Any, mesh: Mesh) -> StepFn:
    """The step compiled with explicit shardings: state in its layout (donated), every batch array's rows
    (axis 0) over (`data`, `fsdp`), metrics replicated. The batch sharding is one prefix for any keys, so
    datasets whose batches hold different keys (a text dataset no media slots) each compile their own program."""
    return jax.jit(
        step,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh, 1)),
        out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )
