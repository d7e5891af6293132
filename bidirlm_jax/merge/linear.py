"""The linear merge kernel, θ = Σ wᵢθᵢ / Σ wᵢ, and its in-memory form on JAX pytrees.

The paper fights forgetting by interpolating an adapted encoder with its base, and composes encoders
with specialists (safety, vision, audio) that share the text backbone (paper-recipe §4–§5). The
in-memory form here and the streamed one (`bidirlm_jax.merge.stream`) share one kernel, `combine`,
so they agree bit for bit:

    θ = s·θ₀ + Σ_{i≥1} cᵢ (θᵢ − θ₀)      cᵢ = wᵢ/Σw, s = 1   (normalised; s = Σw, cᵢ = wᵢ otherwise)

which is Σ wᵢθᵢ/Σw rearranged so that models that agree give back exactly that value, whatever the
weights (a model merged with itself is returned bit for bit), accumulated in float32 (or wider) and
cast once to the output dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bidirlm_jax.errors import ConfigError

PyTree = Any


def listing(items: Sequence[str], limit: int = 12) -> str:
    """`items` one per line for an error message, the first `limit` of them."""
    shown = "\n  ".join(items[:limit])
    more = f"\n  … and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {shown}{more}"


def coefficients(weights: Any, normalize: bool, n: int) -> jax.Array | np.ndarray:
    """[s, c₁, …, cₙ₋₁] of the module docstring's formula, float32; traced weights stay traced (under jit)."""
    try:
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        w = jnp.stack([jnp.asarray(x, jnp.float32) for x in weights])
        if normalize:
            return jnp.concatenate([jnp.ones(1, jnp.float32), w[1:] / jnp.sum(w)])
        return jnp.concatenate([jnp.sum(w, keepdims=True), w[1:]])
    if w.size != n:
        raise ConfigError(f"{w.size} weights for {n} models; give one weight per model")
    if not np.all(np.isfinite(w)):
        raise ConfigError(f"weights must be finite numbers, got {w.tolist()}")
    if normalize:
        total = w.sum()
        if abs(total) < 1e-12:
            raise ConfigError(
                f"the weights {w.tolist()} sum to zero, and normalisation divides by their sum; "
                "change the weights or turn normalisation off (--no-normalize / parameters.normalize: false)"
            )
        return np.concatenate([[1.0], w[1:] / total]).astype(np.float32)
    return np.concatenate([[w.sum()], w[1:]]).astype(np.float32)


@partial(jax.jit, static_argnames="out_dtype")
def combine(coeffs: jax.Array, xs: tuple[jax.Array, ...], out_dtype: np.dtype) -> jax.Array:
    """s·x₀ + Σ cᵢ(xᵢ − x₀), accumulated in float32 (float64 inputs under x64 stay float64)."""
    acc_dtype = jnp.promote_types(jnp.float32, jnp.result_type(*xs))
    x0 = xs[0].astype(acc_dtype)
    acc = coeffs[0].astype(acc_dtype) * x0
    for i, x in enumerate(xs[1:], start=1):
        acc = acc + coeffs[i].astype(acc_dtype) * (x.astype(acc_dtype) - x0)
    return acc.astype(out_dtype)


def linear_merge(
    trees: Sequence[PyTree], weights: Sequence[float] | jax.Array, *, normalize: bool = True, dtype: Any = None
) -> PyTree:
    """Σ wᵢ·treeᵢ / Σ wᵢ leaf by leaf (Σ wᵢ·treeᵢ without `normalize`), accumulated in float32.

    Any pytrees of one structure (dicts of arrays, `nnx.State`, …), sharded or not; jit-able, with
    weights that may be traced. Each output leaf takes `dtype`, or the first tree's leaf dtype, and
    keeps its inputs' sharding. Non-floating leaves and mismatched structures or shapes raise
    `ConfigError` naming them.
    """
    if not trees:
        raise ConfigError("linear_merge needs at least one pytree")
    flat0, treedef = jax.tree_util.tree_flatten_with_path(trees[0])
    paths = [jax.tree_util.keystr(p) for p, _ in flat0]
    leaves = [[x for _, x in flat0]]
    for i, tree in enumerate(trees[1:], start=1):
        flat, other = jax.tree_util.tree_flatten_with_path(tree)
        if other != treedef:
            mine, theirs = set(paths), {jax.tree_util.keystr(p) for p, _ in flat}
            diff = sorted(mine ^ theirs) or [f"{treedef} vs {other}"]
            raise ConfigError(f"pytree {i} does not have the structure of pytree 0; differing leaves:{listing(diff)}")
        leaves.append([x for _, x in flat])
    bad_shape = [
        f"{p}: {' vs '.join(str(tuple(jnp.shape(ls[j]))) for ls in leaves)}"
        for j, p in enumerate(paths)
        if len({tuple(jnp.shape(ls[j])) for ls in leaves}) > 1
    ]
    if bad_shape:
        raise ConfigError(f"leaves with different shapes in the merged pytrees:{listing(bad_shape)}")
    not_float = [
        p for j, p in enumerate(paths) if not all(jnp.issubdtype(jnp.result_type(ls[j]), jnp.floating) for ls in leaves)
    ]
    if not_float:
        raise ConfigError(f"a linear merge averages floating-point leaves only; these are not:{listing(not_float)}")
    coeffs = coefficients(weights, normalize, len(trees))
    merged = [
        combine(coeffs, tuple(ls[j] for ls in leaves), np.dtype(dtype or jnp.result_type(leaves[0][j])))
        for j in range(len(paths))
    ]
    return jax.tree_util.tree_unflatten(treedef, merged)


def interpolate(params_a: PyTree, params_b: PyTree, alpha: float | jax.Array, *, dtype: Any = None) -> PyTree:
    """(1 − α)·a + α·b leaf by leaf, computed as a + α(b − a): α = 0 gives `params_a` back bit for bit.

    The paper's "merging ratio r% with the base" is `interpolate(adapted, base, r / 100)`.
    """
    return linear_merge([params_a, params_b], [1 - alpha, alpha], dtype=dtype)
