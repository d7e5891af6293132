"""LoRA adapters (`models.lora`) and their training step (`train.lora`): an adapted model starts as its base,
its adapter gradients are the chain rule of the full-weight gradient, merging gives the adapted model, the
base never changes, and a sharded step equals a single-device one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.losses.causal_lm import causal_lm_loss
from bidirlm_jax.models import lora
from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.models.runtime import Runtime
from bidirlm_jax.models.transformer import Transformer, stack_layers
from bidirlm_jax.sharding import batch_sharding, make_mesh
from bidirlm_jax.train import lora as lora_train
from bidirlm_jax.train.config import base_config
from bidirlm_jax.train.objectives.base import token_sum_grads
from bidirlm_jax.train.optim import make_optimizer
from bidirlm_jax.train.state import StateLayout
from bidirlm_jax.train.step import jit_step, make_step_fn
from bidirlm_jax.train.trainable import param_path, split

CONFIG = get_preset("tiny-gemma3")  # 4 layers, sliding and global, hidden 64
RUN = Runtime(attention="bidirectional")
ADAPTERS = lora.LoRAConfig(rank=4, alpha=8.0)
B, T = 4, 16


def _ids(seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (B, T), 0, CONFIG.vocab_size)


@nnx.jit
def _logits(model, ids):
    return model(ids).logits


def _adapted(runtime=RUN, adapters=ADAPTERS, *, random_b=False):
    model = lora.add_adapters(Transformer(CONFIG, runtime, rngs=nnx.Rngs(0)), adapters, rngs=nnx.Rngs(1))
    if random_b:  # B = 0 at initialisation makes every gradient of A zero: give B values to test the algebra
        for i, (_, _, adapter) in enumerate(lora.adapters(model)):
            adapter.lora_b.set_value(0.05 * jax.random.normal(jax.random.PRNGKey(i), adapter.lora_b.shape))
    return model


@pytest.mark.parametrize("scan", [False, True])
def test_an_adapted_model_starts_exactly_as_its_base(scan):
    runtime = RUN.replace(scan_layers=scan)
    base = Transformer(CONFIG, runtime, rngs=nnx.Rngs(0))
    expected = base(_ids()).logits
    adapted = lora.add_adapters(base, ADAPTERS, rngs=nnx.Rngs(1))
    assert sum(1 for _ in lora.adapters(adapted)) == (1 if scan else CONFIG.num_layers) * 7
    # Eagerly, op by op: B = 0 makes the update exact zeros. (Compiled, XLA may fuse the addition into the
    # projection's dot and accumulate it in another order: equal to rounding, not bit for bit.)
    np.testing.assert_array_equal(adapted(_ids()).logits, expected)  # B = 0: the update adds exact zeros


def test_adapters_carry_the_logical_axes_of_their_weights_stacked_when_scanned():
    model = _adapted(RUN.replace(scan_layers=True))
    q = model.layers.attn.q_proj_lora
    o = model.layers.attn.o_proj_lora
    assert q.lora_a.get_metadata()["out_sharding"] == ("layers", None, "embed")
    assert q.lora_b.get_metadata()["out_sharding"] == ("layers", "heads", "head_dim", None)
    assert o.lora_a.get_metadata()["out_sharding"] == ("layers", None, "heads", "head_dim")
    assert o.lora_b.shape == (CONFIG.num_layers, CONFIG.hidden_size, ADAPTERS.rank)
    assert q.lora_a.dtype == jnp.float32


def test_adapter_gradients_are_the_chain_rule_of_the_full_weight_gradient():
    """W' = W + s·B·A, so dL/dA = s·Bᵀ·G and dL/dB = s·G·Aᵀ with G = dL/dW' (weights flattened [out, in]).
    Both sides are fp32 sums of the same products in another order (the adapted forward adds the update after
    the product, the merged one before): the difference is rounding, ~1e-6 of the gradient's scale here."""
    model = _adapted(random_b=True)
    merged = lora.merge_adapters(model)
    ids = _ids()
    cotangent = jax.random.normal(jax.random.PRNGKey(7), (B, T, CONFIG.hidden_size))

    def loss(m):
        return jnp.sum(m.hidden_states(ids) * cotangent)

    graphdef, adapters, rest = nnx.split(model, lora.LoRAParam, ...)
    grads = jax.jit(jax.grad(lambda a: loss(nnx.merge(graphdef, a, rest))))(adapters)
    full = nnx.jit(nnx.grad(loss))(merged)
    checked = 0
    for i, block in enumerate(model.layers):
        for name, (owner, _) in lora.TARGETS.items():
            adapter = getattr(getattr(block, owner), name + "_lora")
            a, b = np.asarray(adapter.lora_a[...]), np.asarray(adapter.lora_b[...])
            r, s = a.shape[0], ADAPTERS.scale
            g = np.asarray(getattr(getattr(full.layers[i], owner), name)[...])
            g = g.reshape(b.size // r, a.size // r)
            want_a = (s * b.reshape(-1, r).T @ g).reshape(a.shape)
            want_b = (s * g @ a.reshape(r, -1).T).reshape(b.shape)
            got = getattr(getattr(grads["layers"][i], owner), name + "_lora")
            for got_x, want in ((got["lora_a"][...], want_a), (got["lora_b"][...], want_b)):
                np.testing.assert_allclose(got_x, want, atol=1e-4 * np.abs(want).max(), rtol=0)
                checked += 1
    assert checked == CONFIG.num_layers * 7 * 2


def test_merging_gives_the_adapted_model_and_removes_the_adapters():
    model = _adapted(random_b=True)
    merged = lora.merge_adapters(model)
    assert not lora.has_adapters(merged) and lora.has_adapters(model)  # the input keeps its adapters
    adapted, plain = _logits(model, _ids()), _logits(merged, _ids())
    base = _logits(Transformer(CONFIG, RUN, rngs=nnx.Rngs(0)), _ids())
    assert float(jnp.abs(adapted - base).max()) > 1e-2  # the adapters do change the model
    scale = float(jnp.abs(adapted).max())
    assert float(jnp.abs(adapted - plain).max()) <= 1e-5 * scale  # fp32: the update summed in another order


def test_scanned_and_unrolled_adapters_draw_the_same_dropout_masks():
    adapters = lora.LoRAConfig(rank=4, alpha=8.0, dropout=0.3)
    unrolled = _adapted(adapters=adapters, random_b=True)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: _adapted(RUN.replace(scan_layers=True), adapters)))
    scanned = nnx.merge(graphdef, stack_layers(nnx.state(unrolled)))
    with lora.dropout_key(jax.random.PRNGKey(3)):
        a, b = unrolled(_ids()).logits, scanned(_ids()).logits
    without = unrolled(_ids()).logits  # outside a scope: no dropout
    assert float(jnp.abs(a - without).max()) > 1e-3
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.abs(a).max()))


def test_the_frozen_base_takes_its_dtype_while_adapters_and_a_head_stay_fp32():
    from bidirlm_jax.models.heads import EncoderWithHead, HeadConfig

    config = base_config()
    config.lora.rank = 4
    factory = lora_train.model_factory(
        lambda rngs: EncoderWithHead(CONFIG, HeadConfig("classification", 3), RUN, rngs=rngs),
        lora_train.settings(config),
        "bfloat16",
        lora_train.trainable(config.optim),
    )
    dtypes = {
        param_path(p): v.dtype for p, v in nnx.to_flat_state(nnx.state(nnx.eval_shape(lambda: factory(nnx.Rngs(0)))))
    }
    trained = {k for k in dtypes if k.startswith("head/") or "_lora/" in k}
    assert any(k.startswith("head/") for k in trained) and any("_lora/" in k for k in trained)
    assert all(dtypes[k] == jnp.float32 for k in trained)
    assert all(dtypes[k] == jnp.bfloat16 for k in dtypes if k not in trained)


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ConfigError, match="lora.targets"):
        lora.LoRAConfig(rank=4, targets=("q_proj", "qkv"))
    with pytest.raises(ConfigError, match="lora.dropout"):
        lora.LoRAConfig(rank=4, dropout=1.0)


# --- the training step --------------------------------------------------------------------------------


def _step_setup(mesh, *, scan=False, dropout=0.0):
    config = base_config()
    config.lora.update(rank=4, alpha=8.0, dropout=dropout)
    tx, schedule = make_optimizer(config.optim, total_steps=10)
    runtime = RUN.replace(scan_layers=scan)
    chosen = lora_train.trainable(config.optim)
    factory = lora_train.model_factory(
        lambda rngs: Transformer(CONFIG, runtime, rngs=rngs), lora_train.settings(config), "float32", chosen
    )
    layout = StateLayout(CONFIG, tx, mesh, seed=0, runtime=runtime, model_factory=factory, trainable=chosen)
    grad_fn = lora_train.adapter_grads(token_sum_grads(causal_lm_loss), chosen, dropout=dropout > 0)
    batch = {"input_ids": _ids(), "attention_mask": jnp.ones((B, T), jnp.int32)}
    step = jit_step(make_step_fn(layout.graphdef, grad_fn, tx, schedule, trainable=chosen), layout.shardings, mesh)
    return layout, step, jax.device_put(batch, batch_sharding(mesh))


def _flat(params):
    return {param_path(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}


def _run(mesh, steps=3, **kw):
    layout, step, batch = _step_setup(mesh, **kw)
    state = layout.init()
    before = _flat(state.params)
    losses = []
    with jax.set_mesh(mesh):
        for _ in range(steps):
            state, out = step(state, batch)
            losses.append(float(out["loss"]))
    return layout, state, before, losses


def test_a_lora_step_trains_only_the_adapters_and_leaves_the_base_bit_identical():
    layout, state, before, losses = _run(make_mesh(2, 2, 2), dropout=0.1)
    after = _flat(state.params)
    adapters = {k for k in after if "_lora/" in k}
    assert adapters and all(np.isfinite(losses)) and losses[-1] < losses[0]
    for k, v in after.items():
        if k in adapters:
            continue
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    assert all(not np.array_equal(after[k], before[k]) for k in adapters if k.endswith("lora_b"))
    # Adam's moments for the adapters only
    moments = {param_path(p) for p, _ in nnx.to_flat_state(state.opt_state[1][0].mu)}
    assert moments == adapters


def _grads(layout, mesh, params, batch):
    """The LoRA step's mean gradient of the adapters at `params`, computed on `mesh`."""
    grad_fn = lora_train.adapter_grads(token_sum_grads(causal_lm_loss), layout.trainable, dropout=False)
    params = jax.device_put(params, layout.shardings.params)
    with jax.set_mesh(mesh):
        loss, grads, _, _ = jax.jit(lambda p, b: grad_fn(layout.graphdef, p, b, jax.random.PRNGKey(0)))(params, batch)
    return float(loss), _flat(split(grads, layout.trainable)[0])


@pytest.mark.parametrize("scan", [False, True])
def test_a_sharded_lora_step_equals_a_single_device_one(scan):
    """fp32; the 8-device mesh reduces the batch and the fsdp-split contractions in another order (~1e-6 of the
    gradient's scale). Compared where the adapters are no longer zero (after three single-device steps)."""
    sharded_mesh, single_mesh = make_mesh(2, 2, 2), make_mesh(1, 1, 1, devices=jax.devices()[:1])
    sharded_layout, _, sharded_batch = _step_setup(sharded_mesh, scan=scan)
    single_layout, single, _, _ = _run(single_mesh, scan=scan)
    batch = {k: np.asarray(v) for k, v in sharded_batch.items()}
    loss_a, got = _grads(
        sharded_layout, sharded_mesh, single.params, jax.device_put(batch, batch_sharding(sharded_mesh))
    )
    loss_b, want = _grads(single_layout, single_mesh, single.params, jax.device_put(batch, batch_sharding(single_mesh)))
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    assert got.keys() == want.keys() and any("_lora/" in k for k in want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-5 * np.abs(want[k]).max(), err_msg=k)
