"""One optimizer step: forward, backward over `grad_accum` micro-batches, clip, AdamW; jitted on a mesh.

Losses are accumulated as token sums (see `losses`), so the gradient is the token-weighted mean over
the whole global batch whatever its split into devices and micro-batches. Micro-batches are taken
strided (row i goes to micro-batch i mod k), so every micro-batch keeps rows on every device and the
split needs no communication.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bidirlm_jax import sharding
from bidirlm_jax.train.losses import Batch, LossFn
from bidirlm_jax.train.state import TrainState

StepFn = Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]


def _micro_batches(batch: Batch, k: int) -> Batch:
    """[B, ...] → [k, B/k, ...] with row i in micro-batch i mod k."""

    def split(x: jax.Array) -> jax.Array:
        x = jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
        return sharding.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree.map(split, dict(batch))


def loss_and_grads(
    graphdef: nnx.GraphDef, loss_fn: LossFn, params: nnx.State, batch: Batch, rng: jax.Array, *, grad_accum: int = 1
) -> tuple[jax.Array, nnx.State, jax.Array, dict[str, jax.Array]]:
    """(token-mean loss, token-mean gradients, token count, token-mean metrics) over the whole batch,
    run as `grad_accum` micro-batches in a `lax.scan` (activations of one micro-batch live at a time)."""

    def sums(p: nnx.State, mb: Batch, key: jax.Array):
        loss, count, metrics = loss_fn(nnx.merge(graphdef, p), mb, key)
        return loss, (count, metrics)

    grad_sums = jax.value_and_grad(sums, has_aux=True)
    if grad_accum == 1:
        (loss, (count, metrics)), grads = grad_sums(params, batch, rng)
    else:
        mbs = _micro_batches(batch, grad_accum)
        first = jax.tree.map(lambda x: x[0], mbs)
        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_sums, params, first, rng))

        def micro(carry, xs):
            mb, key = xs
            return jax.tree.map(jnp.add, carry, grad_sums(params, mb, key)), None

        ((loss, (count, metrics)), grads), _ = jax.lax.scan(micro, zeros, (mbs, jax.random.split(rng, grad_accum)))
    denom = jnp.maximum(count, 1.0)
    mean = lambda x: x / denom
    return mean(loss), jax.tree.map(mean, grads), count, {k: mean(v) for k, v in metrics.items()}


def make_step_fn(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    grad_accum: int = 1,
    skip_nonfinite: bool = False,
) -> StepFn:
    """The pure step function `(state, batch) -> (state, metrics)`; see `jit_step` for the compiled one.

    Metrics: `loss` (token mean), `grad_norm` (before clipping), `learning_rate` (the one applied),
    `tokens` (scored tokens), `finite` (1.0 when loss and gradients were finite) and the objective's own
    metrics as token means. With `skip_nonfinite`, a non-finite step leaves params and optimizer state
    untouched (the step counter and RNG still advance, so the data stays in sync).
    """

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng, step_rng = jax.random.split(state.rng)
        loss, grads, count, metrics = loss_and_grads(
            graphdef, loss_fn, state.params, batch, step_rng, grad_accum=grad_accum
        )
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
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


def jit_step(step: StepFn, state_shardings: Any, mesh: Mesh, example_batch: Batch) -> StepFn:
    """The step compiled with explicit shardings: state in its layout (donated), batch rows over
    (`data`, `fsdp`), metrics replicated."""
    batch_shardings = {k: sharding.batch_sharding(mesh, jnp.ndim(v)) for k, v in example_batch.items()}
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )
