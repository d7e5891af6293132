"""Scanned layers (`scan_layers=True`) compute what the unrolled stack computes, logits and gradients, for
both families with sliding layers in both attention modes; `stack_layers` / `unstack_layers` convert
between the two parameter layouts exactly (states, pure dicts, abstract shapes)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bidirlm_jax.io.checkpoint import load_checkpoint, save_checkpoint
from bidirlm_jax.io.hf import from_pretrained, save_pretrained
from bidirlm_jax.models.config import FULL, SLIDING
from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.models.runtime import Runtime
from bidirlm_jax.models.transformer import Transformer, abstract_model, relayout, stack_layers, unstack_layers

ROOT = Path(__file__).resolve().parents[1]

B, T = 2, 24
QWEN3_SLIDING = get_preset("tiny-qwen3", num_layers=3, layer_types=(FULL, SLIDING, SLIDING), sliding_window=8)
MODELS = {  # (architecture, run settings)
    "gemma3-half": (get_preset("tiny-gemma3"), Runtime(attention="bidirectional", bidirectional_window="half")),
    "gemma3-causal": (get_preset("tiny-gemma3"), Runtime()),
    "qwen3-sliding-full": (QWEN3_SLIDING, Runtime(attention="bidirectional", bidirectional_window="full")),
    "qwen3-sliding-causal": (QWEN3_SLIDING, Runtime()),
}


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 512, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    mask[0, -5:] = 0
    segments = np.stack([np.repeat([1, 2, 0], [10, 9, 5]), np.repeat([1, 2], [14, 10])]).astype(np.int32)
    positions = np.stack([np.r_[np.arange(10), np.arange(9), np.zeros(5)], np.r_[np.arange(14), np.arange(10)]])
    return ids, mask, segments, positions.astype(np.int32)


def _loss_and_grads(model):
    ids, mask, segments, positions = _batch()
    weights = jax.random.normal(jax.random.PRNGKey(1), (B, T, model.config.vocab_size)) * mask[:, :, None]

    def loss(model):
        logits = model(ids, mask, segment_ids=segments, positions=positions).logits
        return jnp.sum(logits * weights), logits

    (_, logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    return np.asarray(logits)[mask.astype(bool)], grads


def _flat(state) -> dict:
    return {path: np.asarray(v.get_value() if isinstance(v, nnx.Variable) else v) for path, v in
            nnx.to_flat_state(state)}  # fmt: skip


@pytest.mark.parametrize("name, remat", [(name, "none") for name in MODELS] + [("gemma3-half", "full")])
def test_scanned_equals_unrolled(name, remat):
    config, runtime = MODELS[name]
    runtime = runtime.replace(remat=remat)
    unrolled = Transformer(config, runtime, rngs=nnx.Rngs(0))
    scanned = Transformer(config, runtime.replace(scan_layers=True), rngs=nnx.Rngs(0))  # same init, stacked
    logits, grads = _loss_and_grads(unrolled)
    scanned_logits, scanned_grads = _loss_and_grads(scanned)
    # The scan regroups each layer's fp32 sums (64-wide matmuls, ~fp32_tol(64) = 7.6e-6 of values of order 1)
    np.testing.assert_allclose(scanned_logits, logits, rtol=1e-5, atol=1e-5)
    expected, ours = _flat(grads), _flat(unstack_layers(scanned_grads))
    assert expected.keys() == ours.keys()
    for path in expected:  # fp32 sums in another order: relative to each gradient's largest entry
        scale = np.abs(expected[path]).max()
        assert np.abs(ours[path] - expected[path]).max() <= 1e-5 * scale + 1e-7, path  # + 1e-7: all-zero leaves


def test_stack_and_unstack_layouts():
    config, runtime = MODELS["gemma3-half"]
    unrolled = nnx.state(Transformer(config, runtime, rngs=nnx.Rngs(0)), nnx.Param)
    scanned = nnx.state(Transformer(config, runtime.replace(scan_layers=True), rngs=nnx.Rngs(0)), nnx.Param)
    stacked = stack_layers(unrolled)
    assert _flat(stacked).keys() == _flat(scanned).keys()
    for path, value in _flat(stacked).items():
        np.testing.assert_array_equal(value, _flat(scanned)[path])
    q_proj = stacked["layers"]["attn"]["q_proj"]
    assert q_proj.shape == (config.num_layers, config.num_heads, config.head_dim, config.hidden_size)
    assert q_proj.get_metadata()["out_sharding"] == ("layers", "heads", "head_dim", "embed")
    back = unstack_layers(scanned)
    assert back["layers"][1]["attn"]["q_proj"].get_metadata()["out_sharding"] == ("heads", "head_dim", "embed")
    for path, value in _flat(back).items():
        np.testing.assert_array_equal(value, _flat(unrolled)[path])
    # pure dicts of host arrays (what the converters hold) and abstract shapes
    pure = stack_layers(jax.tree.map(np.asarray, unrolled.to_pure_dict()))
    assert isinstance(pure["layers"]["mlp"]["up_proj"], np.ndarray)
    assert unstack_layers(pure)["layers"][3]["mlp"]["up_proj"].shape == (config.intermediate_size, config.hidden_size)
    _, abstract = abstract_model(config, runtime.replace(scan_layers=True))
    shapes = unstack_layers(abstract)
    assert shapes["layers"][0]["attn"]["k_proj"].shape == (config.num_kv_heads, config.head_dim, config.hidden_size)


# --- the boundary: HF files, exchange checkpoints and training runs keep one tensor per layer -----------


def _params(model) -> dict:
    return _flat(nnx.state(relayout(model, False), nnx.Param))


def test_hf_files_load_scanned_and_save_per_layer(qwen_dir, tmp_path):
    unrolled = from_pretrained(qwen_dir)
    scanned = from_pretrained(qwen_dir, runtime=Runtime(scan_layers=True))
    assert scanned.runtime.scan_layers and "0" not in nnx.state(scanned)["layers"]
    ids = np.arange(3, 3 + 2 * T, dtype=np.int32).reshape(2, T) % scanned.config.vocab_size
    np.testing.assert_allclose(scanned(ids).logits, unrolled(ids).logits, rtol=1e-5, atol=1e-5)  # as above
    save_pretrained(scanned, tmp_path / "hf")
    save_checkpoint(scanned, tmp_path / "ckpt")
    expected = _params(unrolled)
    for loaded in (
        from_pretrained(tmp_path / "hf"),
        load_checkpoint(tmp_path / "ckpt"),
        from_pretrained(tmp_path / "ckpt", runtime=Runtime(scan_layers=True)),
    ):
        got = _params(loaded)
        assert got.keys() == expected.keys()
        for path, value in expected.items():
            np.testing.assert_array_equal(got[path], value, err_msg=str(path))


@pytest.mark.slow
def test_a_scanned_run_trains_resumes_and_exports_per_layer(qwen_dir, tmp_path, capsys):
    """A run with scan_layers=True starts from HF weights, checkpoints stacked, reads back in either layout,
    and refuses to resume unrolled."""
    from bidirlm_jax.cli import main as cli_main

    args = ["train", "--config", f"{ROOT}/configs/lm.py:tiny", "--workdir", str(tmp_path / "run")]
    args += ["--config.metrics.progress_bar=False", "--config.metrics.tensorboard=False", "--config.train.steps=1"]
    args += [f"--config.model.init_from={qwen_dir}", "--config.optim.learning_rate=0"]
    assert cli_main([*args, "--config.model.scan_layers=True"]) == 0
    expected = _params(from_pretrained(qwen_dir))
    for loaded in (
        from_pretrained(tmp_path / "run"),
        from_pretrained(tmp_path / "run", runtime=Runtime(scan_layers=True)),
    ):
        got = _params(loaded)
        assert got.keys() == expected.keys()
        for path, value in expected.items():
            np.testing.assert_array_equal(got[path], value, err_msg=str(path))  # learning rate 0: the HF weights
    capsys.readouterr()
    assert cli_main([*args, "--config.train.steps=2"]) == 2
    assert "written with model.scan_layers=True, the config says False" in capsys.readouterr().err
