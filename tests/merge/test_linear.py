"""The kernel and the in-memory merge (`bidirlm_jax.merge.linear`): jit, shardings, NNX state, refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.merge import interpolate, linear_merge
from bidirlm_jax.testing.tolerance import merge_tol
from tests.merge.checkpoints import assert_mean


def test_in_memory_jit_sharded_pytrees():
    mesh = jax.make_mesh((8,), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    rng = np.random.default_rng(0)

    def tree(seed_shift):
        leaves = [rng.standard_normal(s, dtype=np.float32) + seed_shift for s in [(16, 8), (8,), (24, 4)]]
        return {
            "w": jax.device_put(leaves[0], sharding),
            "layers": [(jnp.asarray(leaves[1], jnp.bfloat16), None)],
            "head": {"b": jax.device_put(leaves[2], sharding)},
        }

    a, b = tree(0.0), tree(1.0)
    merged = jax.jit(interpolate)(a, b, 0.25)  # alpha traced
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(a)
    for leaf in (merged["w"], merged["head"]["b"]):  # still split over the 8 devices, not gathered
        assert leaf.sharding.is_equivalent_to(sharding, 2) and len(leaf.addressable_shards) == 8
    assert merged["layers"][0][0].dtype == jnp.bfloat16
    for m, x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(a), jax.tree.leaves(b)):
        ref = 0.75 * np.asarray(x, np.float64) + 0.25 * np.asarray(y, np.float64)
        if m.dtype == jnp.bfloat16:  # the fp32 result rounded to bf16's 8 bits: half of bf16's eps (2^-7)
            np.testing.assert_allclose(np.asarray(m, np.float64), ref, rtol=2.0**-8, atol=0)
        else:
            assert (np.abs(np.asarray(m, np.float64) - ref) <= merge_tol(x, y)).all()
    assert all(
        np.array_equal(np.asarray(m), np.asarray(x))
        for m, x in zip(jax.tree.leaves(interpolate(a, b, 0.0)), jax.tree.leaves(a))
    )
    three = jax.jit(lambda ts: linear_merge(ts, [1.0, 1.0, 2.0], dtype=jnp.float32))([a, b, b])
    ref = (np.asarray(a["w"], np.float64) + 3 * np.asarray(b["w"], np.float64)) / 4
    assert (np.abs(np.asarray(three["w"]) - ref) <= merge_tol(a["w"], b["w"], b["w"])).all()
    assert three["layers"][0][0].dtype == jnp.float32


def test_in_memory_nnx_state():
    from flax import nnx

    def state(seed):
        return nnx.split(nnx.Linear(4, 3, rngs=nnx.Rngs(seed)))

    graphdef, sa = state(0)
    _, sb = state(1)
    model = nnx.merge(graphdef, interpolate(sa, sb, 0.5))
    assert_mean(model.kernel[...], sa["kernel"][...], sb["kernel"][...])


def test_in_memory_refuses_bad_trees():
    a = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
    with pytest.raises(ConfigError, match=r"\['c'\]"):
        linear_merge([a, {"w": jnp.ones((2, 3)), "c": jnp.ones(3)}], [0.5, 0.5])
    with pytest.raises(ConfigError, match=r"\['w'\].*\(2, 3\) vs \(3, 2\)"):
        linear_merge([a, {"w": jnp.ones((3, 2)), "b": jnp.ones(3)}], [0.5, 0.5])
    with pytest.raises(ConfigError, match=r"(?s)floating.*\['step'\]"):
        linear_merge([{"step": jnp.ones(2, jnp.int32)}] * 2, [0.5, 0.5])
    with pytest.raises(ConfigError, match="sum to zero"):
        linear_merge([a, a], [1.0, -1.0])
