"""Training a subset of the parameters: frozen ones hold no optimizer state, never change, and their
gradients are not computed; a run with frozen parameters checkpoints and resumes bit-exactly."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.losses.causal_lm import causal_lm_loss
from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.sharding import batch_sharding, make_mesh
from bidirlm_jax.train import parse_train_args, train
from bidirlm_jax.train.config import base_config
from bidirlm_jax.train.objectives.base import token_sum_grads
from bidirlm_jax.train.optim import make_optimizer
from bidirlm_jax.train.state import StateLayout
from bidirlm_jax.train.step import jit_step, make_step_fn
from bidirlm_jax.train.trainable import from_config, param_path, regex_filter

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "lm.py") + ":tiny"
FROZEN = ("embedder/.*", "layers/.*/mlp/.*")  # the embedding and every MLP
B, T = 8, 32


def _layout(frozen=()):
    optim = base_config().optim
    optim.frozen = frozen
    tx, schedule = make_optimizer(optim, total_steps=10)
    mesh = make_mesh(2, 2, 2)
    layout = StateLayout(get_preset("tiny-qwen3"), tx, mesh, seed=0, trainable=from_config(optim))
    return layout, tx, schedule, mesh


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _frozen(path) -> bool:
    name = param_path(path)
    return name.startswith("embedder/") or "/mlp/" in name


def test_frozen_parameters_hold_no_optimizer_state():
    full, partial = _layout()[0].abstract, _layout(FROZEN)[0].abstract
    flat = nnx.to_flat_state(full.params)
    trainable_bytes = sum(v.size * v.dtype.itemsize for path, v in flat if not _frozen(path))
    assert 0 < trainable_bytes < _bytes(full.params) / 2  # the MLPs and the embedding are most of the model
    # Adam's two moments (and a step count) for the trainable parameters only; the params themselves all stay
    assert _bytes(full.opt_state) - _bytes(partial.opt_state) == 2 * (_bytes(full.params) - trainable_bytes)
    assert _bytes(partial.params) == _bytes(full.params)
    moment_paths = {param_path(p) for p, _ in nnx.to_flat_state(partial.opt_state[1][0].mu)}
    assert moment_paths == {param_path(p) for p, _ in flat if not _frozen(p)}


def _batch():
    ids = jax.random.randint(jax.random.PRNGKey(1), (B, T), 0, get_preset("tiny-qwen3").vocab_size)
    return {"input_ids": ids, "attention_mask": jnp.ones((B, T), jnp.int32)}


def _step(layout, tx, schedule, mesh):
    fn = make_step_fn(layout.graphdef, token_sum_grads(causal_lm_loss), tx, schedule, trainable=layout.trainable)
    return jit_step(fn, layout.shardings, mesh)


def test_frozen_parameters_stay_bit_identical_and_the_others_train():
    layout, tx, schedule, mesh = _layout(FROZEN)
    state = layout.init()
    before = {param_path(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state.params)}
    step = _step(layout, tx, schedule, mesh)
    batch = jax.device_put(_batch(), batch_sharding(mesh))
    with jax.set_mesh(mesh):
        for _ in range(3):
            state, out = step(state, batch)
    assert np.isfinite(float(out["loss"]))
    for path, v in nnx.to_flat_state(state.params):
        name, after = param_path(path), np.asarray(v.get_value())
        if _frozen(path):
            np.testing.assert_array_equal(after, before[name], err_msg=name)
        elif after.ndim > 1:  # norm scales may not move in 3 steps of a tiny lr; matrices do
            assert not np.array_equal(after, before[name]), name


def test_frozen_gradients_are_not_computed():
    """The compiled step does less work by at least the frozen MLPs' weight gradients (dW = xᵀ·dy, 2·N·d·f
    FLOPs for each of gate, up and down per layer over N = B·T tokens): XLA drops what only fed them."""
    cfg = get_preset("tiny-qwen3")
    flops = {}
    for frozen in ((), FROZEN):
        layout, tx, schedule, mesh = _layout(frozen)
        batch = jax.eval_shape(_batch)
        with jax.set_mesh(mesh):
            compiled = _step(layout, tx, schedule, mesh).lower(layout.abstract, batch).compile()
        flops[frozen] = compiled.cost_analysis()["flops"]
    weight_grads = cfg.num_layers * 3 * 2 * B * T * cfg.hidden_size * cfg.intermediate_size
    devices = 8  # cost_analysis counts one device's share of the SPMD program
    assert flops[()] - flops[FROZEN] >= weight_grads / devices


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("frozen", ("embeder/.*",), "optim.frozen: 'embeder/.*' matches no parameter path"),
        ("trainable", ("nothing",), "optim.trainable: 'nothing' matches no parameter path"),
        ("frozen", (".*",), "leave no parameter to train"),
        ("frozen", ("(",), "optim.frozen: '\\(' is not a regular expression"),
    ],
)
def test_bad_subsets_are_refused(tmp_path, key, value, message):
    config, workdir = parse_train_args(["--config", TINY, "--workdir", str(tmp_path)])
    config.optim[key] = value
    with pytest.raises(ConfigError, match=message):
        train(config, workdir)
    assert not (tmp_path / "checkpoints").exists()


def test_a_single_regex_string_is_refused():
    with pytest.raises(ConfigError, match="must be a list of regexes"):
        regex_filter(frozen="embedder/.*")  # else each character would be a regex


def _params(workdir, step):
    path = workdir.absolute() / "checkpoints" / str(step) / "state"
    return ocp.StandardCheckpointer().restore(path)["params"]


def test_a_run_with_frozen_parameters_resumes_bit_exactly(tmp_path):
    def run(workdir, steps):
        args = ["--config", TINY, "--workdir", str(workdir), "--config.metrics.progress_bar=False"]
        config, _ = parse_train_args([*args, "--config.metrics.tensorboard=False", "--config.optim.schedule=constant"])
        config.optim.update(frozen=FROZEN, warmup_steps=0)
        config.train.update(steps=steps, checkpoint_every=2, log_every=1)
        return train(config, str(workdir))

    run(tmp_path / "whole", 4)
    run(tmp_path / "resumed", 2)
    assert run(tmp_path / "resumed", 4)["step"] == 4
    whole, resumed, start = (
        _params(tmp_path / "whole", 4),
        _params(tmp_path / "resumed", 4),
        _params(tmp_path / "whole", 2),
    )
    for (path, a), b, c in zip(
        jax.tree_util.tree_leaves_with_path(whole), jax.tree.leaves(resumed), jax.tree.leaves(start)
    ):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
        if "embedder" in jax.tree_util.keystr(path):
            np.testing.assert_array_equal(a, c)  # frozen across the checkpoint too
