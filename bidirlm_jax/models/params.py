"""Parameter counts computed abstractly: `jax.eval_shape` builds no arrays, so a 32B model costs nothing."""

from __future__ import annotations

import math

import jax
from flax import nnx


def count(state: nnx.State) -> int:
    """Parameters of a (shape-only) model state, e.g. `abstract_model(config)`'s; tied weights are held once."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state.filter(nnx.Param)))
