"""The jitted train step on 8 fake CPU devices: sharded = single device, shardings follow the rules,
gradient accumulation = one big batch, non-finite steps skipped when asked."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from bidirlm_jax.losses.causal_lm import causal_lm_loss
from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.models.runtime import DEFAULT_RUNTIME, Runtime
from bidirlm_jax.sharding import logical_to_spec, make_mesh
from bidirlm_jax.testing.tolerance import EPS32, fp32_tol, ulps
from bidirlm_jax.train.config import base_config
from bidirlm_jax.train.objectives import token_sum_grads
from bidirlm_jax.train.optim import make_optimizer
from bidirlm_jax.train.state import StateLayout
from bidirlm_jax.train.step import jit_step, make_step_fn

CONFIG = get_preset("tiny-qwen3")  # 4 heads, 2 KV heads: tensor=4 must fall back to replicating KV heads
RNG = jax.random.PRNGKey(0)
TOKENS = 16 * 31 - 12  # the batch's scored targets: the loss and every gradient sum this many terms
# Another mesh or program sums those token terms in another order. The loss is a sum of positive terms,
# so its relative error is bounded by the reduction; gradients cancel, so theirs is bounded at the leaf's
# scale. A wrong token weight or a lost all-reduce moves either by orders of magnitude more.
LOSS_RTOL = fp32_tol(TOKENS)
GRAD_RTOL = fp32_tol(TOKENS)


@pytest.fixture(scope="module")
def tx():
    return make_optimizer(base_config().optim, total_steps=100)


@pytest.fixture(scope="module")
def batch():
    ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (16, 32)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[3, 20:] = 0  # padding: its targets must not count
    return {"input_ids": ids, "attention_mask": mask}


def _grads_on(mesh_shape, batch, tx, grad_accum=1, runtime=DEFAULT_RUNTIME):
    mesh = make_mesh(*mesh_shape, devices=jax.devices()[: int(np.prod(mesh_shape))])
    layout = StateLayout(CONFIG, tx[0], mesh, seed=0, runtime=runtime)
    state = layout.init()
    fn = functools.partial(token_sum_grads(causal_lm_loss, grad_accum=grad_accum), layout.graphdef)
    with jax.set_mesh(mesh):
        loss, grads, count, metrics = jax.jit(fn)(state.params, batch, RNG)
    return state, float(loss), jax.tree.map(np.asarray, grads), float(count)


@pytest.fixture(scope="module")
def grads_on(batch, tx):
    """`_grads_on` for this module's batch, each (mesh, accumulation, run settings) compiled once."""
    cache = {}

    def get(mesh_shape, grad_accum=1, runtime=DEFAULT_RUNTIME):
        key = (mesh_shape, grad_accum, runtime)
        if key not in cache:
            cache[key] = _grads_on(mesh_shape, batch, tx, grad_accum, runtime)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def reference(grads_on):
    return grads_on((1, 1, 1))


def assert_close(actual, expected, rtol: float) -> None:
    """Every leaf within `rtol` of its own scale (largest magnitude). An elementwise relative tolerance is
    meaningless for entries near zero, an absolute one for leaves far from 1 (these gradients are ~1e-3)."""
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=rtol * np.abs(b).max())


# What the rules give the [vocab, embed] embedding table on each mesh (vocab -> tensor, embed -> fsdp).
EMBEDDING_SPEC = {
    (8, 1, 1): PartitionSpec(None, None),
    (1, 8, 1): PartitionSpec(None, "fsdp"),
    (2, 2, 2): PartitionSpec("tensor", "fsdp"),
    (1, 2, 4): PartitionSpec("tensor", "fsdp"),
}


@pytest.mark.parametrize("mesh_shape", list(EMBEDDING_SPEC))
def test_sharded_loss_and_grads_equal_single_device(mesh_shape, grads_on, reference):
    _, ref_loss, ref_grads, ref_count = reference
    state, loss, grads, count = grads_on(mesh_shape)
    assert count == ref_count == 16 * 31 - 12
    assert loss == pytest.approx(ref_loss, rel=LOSS_RTOL)
    assert_close(grads, ref_grads, rtol=GRAD_RTOL)

    # Every parameter and Adam moment lives where the logical rules say, and is created sharded.
    mesh = state.step.sharding.mesh
    adam = state.opt_state[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
    for tree in (state.params, adam.mu, adam.nu):
        for path, var in nnx.to_flat_state(tree):
            arr = var.get_value()
            expected = logical_to_spec(var.get_metadata()["out_sharding"], arr.shape, mesh)
            assert arr.sharding.spec == expected, path
            local = arr.sharding.shard_shape(arr.shape)
            assert arr.addressable_shards[0].data.shape == local
            if "kv_heads" in var.get_metadata()["out_sharding"] and mesh.shape["tensor"] == 4:
                assert "tensor" not in jax.tree.leaves(tuple(expected))  # 2 KV heads do not split 4 ways
    assert state.params["embedder"]["embedding"].get_value().sharding.spec == EMBEDDING_SPEC[mesh_shape]


def test_grad_accumulation_equals_one_big_batch(grads_on, reference):
    _, ref_loss, ref_grads, ref_count = reference
    _, loss, grads, count = grads_on((1, 1, 1), grad_accum=4)
    assert count == ref_count
    assert loss == pytest.approx(ref_loss, rel=LOSS_RTOL)  # micro-batch sums added in another order
    assert_close(grads, ref_grads, rtol=GRAD_RTOL)


def test_grad_accumulation_on_a_mesh_weights_micro_batches_by_tokens(grads_on, reference):
    # Micro-batches with very different token counts (padding) still give the global token mean.
    _, ref_loss, ref_grads, _ = reference
    _, loss, grads, _ = grads_on((2, 2, 2), grad_accum=2)
    assert loss == pytest.approx(ref_loss, rel=LOSS_RTOL)
    assert_close(grads, ref_grads, rtol=GRAD_RTOL)


@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_remat_policies_change_memory_not_results(remat, grads_on, reference):
    _, ref_loss, ref_grads, _ = reference
    _, loss, grads, _ = grads_on((1, 1, 1), runtime=Runtime(remat=remat))
    assert loss == pytest.approx(ref_loss, rel=LOSS_RTOL)  # recomputation may fuse, so round, differently
    assert_close(grads, ref_grads, rtol=GRAD_RTOL)


def test_bf16_compute_keeps_fp32_master_weights_and_loss(grads_on, reference):
    _, ref_loss, ref_grads, _ = reference
    state, loss, grads, _ = grads_on((1, 1, 1), runtime=Runtime(dtype="bfloat16"))
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(grads)} == {np.dtype("float32")}
    # bf16 activations under an fp32 loss: within about one bf16 ULP (2^-8 = 3.9e-3), yet not equal
    assert loss == pytest.approx(ref_loss, rel=5e-3) and loss != ref_loss


def test_step_applies_adamw_and_reports_metrics(batch, tx, grads_on, reference):
    mesh = make_mesh(2, 2, 2)
    layout = StateLayout(CONFIG, tx[0], mesh, seed=0)
    state = layout.init()
    before = jax.tree.map(np.array, state.params)  # copies: a zero-copy view would block donation
    step = jit_step(make_step_fn(layout.graphdef, token_sum_grads(causal_lm_loss), *tx), layout.shardings, mesh)
    with jax.set_mesh(mesh):
        new, out = step(state, batch)
    assert state.params["final_norm"]["weight"].get_value().is_deleted()  # donated
    assert int(new.step) == 1
    _, ref_loss, ref_grads, _ = reference
    assert float(out["loss"]) == pytest.approx(ref_loss, rel=LOSS_RTOL)
    assert float(out["grad_norm"]) == pytest.approx(float(optax.global_norm(ref_grads)), rel=GRAD_RTOL)
    lr = float(tx[1](0))
    assert float(out["learning_rate"]) == pytest.approx(lr, rel=EPS32)  # the same schedule: one rounding
    assert 0.0 <= float(out["accuracy"]) <= 1.0 and float(out["finite"]) == 1.0
    # The step's gradient comes from its own program, so it differs from `grads_on`'s by up to GRAD_RTOL of
    # the leaf's scale (δg). AdamW's first update is -lr·(ĝ/(|ĝ|+eps) + wd·p) with ĝ the clipped gradient:
    # where |ĝ| >> eps it is ±lr whatever δg, but near eps its slope eps/(|ĝ|+eps)² turns δg into up to
    # 2·lr. Each entry is allowed that slope's bound over [|ĝ|-δg, |ĝ|+δg] plus a few ulps of p and lr.
    grads = grads_on((2, 2, 2))[2]
    expected = optax.apply_updates(before, tx[0].update(grads, tx[0].init(before), before)[0])
    eps = base_config().optim.eps
    clip = min(1.0, base_config().optim.grad_clip_norm / float(optax.global_norm(grads)))
    leaves = zip(
        jax.tree.leaves(jax.tree.map(np.asarray, new.params)), jax.tree.leaves(expected), jax.tree.leaves(grads)
    )
    for a, b, g in leaves:
        g = np.abs(g) * clip
        delta = GRAD_RTOL * g.max()
        slope = eps / (np.maximum(g - delta, 0) + eps) ** 2
        tol = lr * np.minimum(2.0, delta * slope) + ulps(b, 2) + ulps(lr, 4)
        assert (np.abs(a - b) <= tol).all(), np.abs(a - b).max() / lr
    assert (
        new.params["final_norm"]["weight"].get_value().sharding
        == layout.shardings.params["final_norm"]["weight"].get_value()
    )


def test_non_finite_step_is_flagged_and_skipped_when_asked(batch, tx):
    def nan_loss(model, b, rng):
        loss, count, metrics = causal_lm_loss(model, b, rng)
        return loss * jnp.nan, count, metrics

    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    layout = StateLayout(CONFIG, tx[0], mesh, seed=0)
    state = layout.init()
    before = jax.tree.map(np.array, (state.params, state.opt_state))
    step = jax.jit(make_step_fn(layout.graphdef, token_sum_grads(nan_loss), *tx, skip_nonfinite=True))
    new, out = step(state, batch)
    assert float(out["finite"]) == 0.0 and int(new.step) == 1
    after = jax.tree.map(np.asarray, (new.params, new.opt_state))
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)
