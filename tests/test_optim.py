"""Schedules (WSD with each decay shape, warmup+linear, constant), the AdamW decay mask, clipping, and AdamW
against a float64 reference."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.models.transformer import Transformer
from bidirlm_jax.train.config import base_config
from bidirlm_jax.train.optim import decay_mask, make_optimizer, make_schedule


def _values(schedule, steps):
    return np.array([float(schedule(s)) for s in steps])


@pytest.mark.parametrize(
    "shape, midpoint",  # value halfway through the decay, as a fraction of the peak
    [("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - np.sqrt(0.5))],
)
def test_wsd_warms_up_holds_and_decays_with_its_shape(shape, midpoint):
    """Schedules are a few fp32 operations on the step: rtol 1e-6 is ~8 ulps; the midpoint takes a cos or
    sqrt of a rounded fraction (1e-5), and the end is 0 within one ulp of the peak."""
    s = make_schedule("wsd", peak=1.0, total_steps=100, warmup_steps=10, decay_fraction=0.2, decay_shape=shape)
    np.testing.assert_allclose(_values(s, [0, 4, 9]), [0.1, 0.5, 1.0], rtol=1e-6)  # linear warmup
    np.testing.assert_allclose(_values(s, [10, 50, 80]), 1.0)  # stable until the decay starts at step 80
    np.testing.assert_allclose(float(s(90)), midpoint, rtol=1e-5)
    assert float(s(100)) == pytest.approx(0.0, abs=1e-7)
    assert np.all(np.diff(_values(s, range(80, 101))) < 0)


def test_linear_decays_from_the_end_of_warmup_to_the_final_fraction():
    s = make_schedule("linear", peak=2.0, total_steps=110, warmup_steps=10, final_fraction=0.1)
    np.testing.assert_allclose(_values(s, [9, 60, 110]), [2.0, 2.0 * (0.1 + 0.9 * 0.5), 0.2], rtol=1e-6)


def test_a_run_shorter_than_its_warmup_just_warms_up():
    s = make_schedule("wsd", peak=1.0, total_steps=4, warmup_steps=10, decay_fraction=0.5)
    np.testing.assert_allclose(_values(s, [0, 3]), [0.1, 0.4], rtol=1e-6)


def test_constant_after_warmup():
    s = make_schedule("constant", peak=3e-4, total_steps=50, warmup_steps=5)
    np.testing.assert_allclose(_values(s, [0, 4, 5, 49]), [6e-5, 3e-4, 3e-4, 3e-4], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="cosine"), "optim.schedule"),
        (dict(kind="wsd", decay_shape="exp"), "optim.decay_shape"),
        (dict(kind="wsd", decay_fraction=1.5), "optim.decay_fraction"),
        (dict(kind="wsd", warmup_steps=-1), "optim.warmup_steps"),
    ],
)
def test_bad_schedule_settings_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_schedule(**{"peak": 1.0, "total_steps": 100, **kwargs})


def test_weight_decay_skips_norms_and_biases():
    config = get_preset("tiny-qwen3", attention_bias=True)
    params = nnx.state(Transformer(config, rngs=nnx.Rngs(0)), nnx.Param)
    mask = dict(nnx.to_flat_state(decay_mask(params)))
    flat = {"/".join(map(str, k)): v for k, v in mask.items()}
    decayed = {k for k, v in flat.items() if v.get_value()}
    assert {"layers/0/attn/q_proj", "embedder/embedding", "layers/0/mlp/down_proj"} <= decayed
    assert "layers/0/attn/q_bias" not in decayed  # 2-D [heads, head_dim], yet a bias
    assert not {k for k in decayed if "norm" in k}


def test_adamw_decays_only_masked_params():
    optim = base_config().optim
    optim.update(learning_rate=0.1, warmup_steps=0, weight_decay=0.5)
    tx, _ = make_optimizer(optim, total_steps=10)
    params = {"w": jnp.ones((2, 2)), "norm": jnp.ones((2,))}
    zero = {"w": jnp.zeros((2, 2)), "norm": jnp.zeros((2,))}
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5)  # decay alone: -lr * wd * w
    np.testing.assert_allclose(updates["norm"], 0.0)


@pytest.mark.parametrize("clip, expected", [(1.0, 0.5 / 1.5), (0.0, 100.0 / 101.0)])
def test_global_grad_norm_clipping(clip, expected):
    # b1 = b2 = 0 and eps = 1: Adam's update is g / (|g| + 1), so the size of g after clipping shows.
    optim = base_config().optim
    optim.update(learning_rate=1.0, warmup_steps=0, weight_decay=0.0, grad_clip_norm=clip, b1=0.0, b2=0.0, eps=1.0)
    tx, _ = make_optimizer(optim, total_steps=10)
    grads = {"w": jnp.full((2, 2), 100.0)}  # global norm 200
    updates, _ = tx.update(grads, tx.init(grads), grads)
    np.testing.assert_allclose(updates["w"], -expected, rtol=1e-6)


def test_adamw_matches_a_float64_reference_over_several_steps():
    # Clipping (active on the large steps), bias correction, the warmup, and decoupled decay (× lr) masked
    # off 1-D parameters: each update checked relative to its size, the only scale that means anything.
    optim = base_config().optim
    optim.update(learning_rate=1e-2, warmup_steps=2, schedule="constant", weight_decay=0.1, grad_clip_norm=1.0)
    tx, schedule = make_optimizer(optim, total_steps=10)
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 4)).astype(np.float32), "norm": rng.normal(size=4).astype(np.float32)}
    state = tx.init(params)
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, scale in enumerate([0.01, 3.0, 0.1, 5.0], start=1):
        grads = {k: rng.normal(scale=scale, size=x.shape).astype(np.float32) for k, x in params.items()}
        updates, state = tx.update(grads, state, params)
        params = {k: np.asarray(x) for k, x in optax.apply_updates(params, updates).items()}

        norm = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads.values()))
        lr = float(schedule(t - 1))
        expected = {}
        for k, g in grads.items():
            g = g * min(1.0, 1.0 / norm)
            m[k] = optim.b1 * m[k] + (1 - optim.b1) * g
            v[k] = optim.b2 * v[k] + (1 - optim.b2) * g**2
            adam = (m[k] / (1 - optim.b1**t)) / (np.sqrt(v[k] / (1 - optim.b2**t)) + optim.eps)
            expected[k] = -lr * (adam + (optim.weight_decay * p[k] if k == "w" else 0.0))
            p[k] = p[k] + expected[k]
        for k in params:
            # fp32 vs float64 Adam: ĝ/(√v̂+eps) loses ~2 ulps a step through the moments, over these steps
            np.testing.assert_allclose(np.asarray(updates[k]), expected[k], rtol=2e-5, err_msg=f"step {t} {k}")
