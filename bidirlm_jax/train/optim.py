"""Learning-rate schedules and the AdamW optimizer the paper's recipe uses.

Schedules are plain functions of the step (what optax expects), so the train step reports the exact
rate it applied. AdamW never decays 1-D parameters (norm scales, biases): decaying a norm's scale
towards zero only fights the model.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from bidirlm_jax.errors import ConfigError

SCHEDULES = ("wsd", "linear", "constant")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


def _decay(progress: jax.Array, shape: str) -> jax.Array:
    """Fraction of the peak left after `progress` ∈ [0, 1] of the decay phase."""
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + jnp.cos(math.pi * progress))
    return 1.0 - jnp.sqrt(progress)


def make_schedule(
    kind: str,
    *,
    peak: float,
    total_steps: int,
    warmup_steps: int = 0,
    decay_fraction: float = 0.1,
    decay_shape: str = "linear",
    final_fraction: float = 0.0,
) -> optax.Schedule:
    """A step → learning-rate function.

    `wsd`: linear warmup, constant plateau, then a decay over the last `decay_fraction` of
    `total_steps` with the given shape (warmup-stable-decay, as in the paper). `linear`: warmup then a
    linear decay over all remaining steps. `constant`: warmup then the peak. Decays end at
    `final_fraction × peak`.
    """
    if kind not in SCHEDULES:
        raise ConfigError(f"optim.schedule={kind!r} is not one of {SCHEDULES}")
    if decay_shape not in DECAY_SHAPES:
        raise ConfigError(f"optim.decay_shape={decay_shape!r} is not one of {DECAY_SHAPES}")
    if not 0.0 <= decay_fraction <= 1.0:
        raise ConfigError(f"optim.decay_fraction={decay_fraction} must lie in [0, 1]")
    if warmup_steps < 0 or total_steps <= 0:
        raise ConfigError(f"optim.warmup_steps={warmup_steps} must be >= 0 and train.steps={total_steps} > 0")
    after_warmup = max(total_steps - warmup_steps, 0)  # a short (smoke-test) run may end inside the warmup
    if kind == "linear":
        decay_shape, decay_steps = "linear", after_warmup
    elif kind == "wsd":
        decay_steps = min(int(round(decay_fraction * total_steps)), after_warmup)
    else:
        decay_steps = 0
    decay_start = total_steps - decay_steps

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum(1.0, (step + 1.0) / warmup_steps) if warmup_steps else jnp.float32(1.0)
        if decay_steps:
            progress = jnp.clip((step - decay_start) / decay_steps, 0.0, 1.0)
            left = final_fraction + (1.0 - final_fraction) * _decay(progress, decay_shape)
        else:
            left = jnp.float32(1.0)
        return peak * warm * left

    return schedule


def _is_bias(path) -> bool:
    return any(str(getattr(k, "key", getattr(k, "name", ""))).endswith("bias") for k in path)


def decay_mask(params) -> object:
    """True for the parameters weight decay applies to: matrices and embeddings, not norms or biases.

    Biases are recognised by name because per-head biases (`q_bias` [heads, head_dim]) are 2-D.
    """
    return jax.tree_util.tree_map_with_path(lambda path, p: p.ndim > 1 and not _is_bias(path), params)


def make_optimizer(optim: ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global grad-norm clipping, from the `optim` section of a train config."""
    schedule = make_schedule(
        optim.schedule,
        peak=optim.learning_rate,
        total_steps=total_steps,
        warmup_steps=optim.warmup_steps,
        decay_fraction=optim.decay_fraction,
        decay_shape=optim.decay_shape,
        final_fraction=optim.final_lr_fraction,
    )
    adamw = optax.adamw(
        schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay, mask=decay_mask
    )
    if optim.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), adamw), schedule
    return adamw, schedule
