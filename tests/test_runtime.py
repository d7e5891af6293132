"""models/runtime.py: the run settings, declared once — their checks, and the one declaration reaching the model,
`from_pretrained`, exports, the train config and the CLI."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import bidirlm_jax
from bidirlm_jax.cli import _build_parser
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.hf_config import read_runtime
from bidirlm_jax.models.config import ModelConfig
from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.models.runtime import (
    ATTENTION_MODES,
    BIDIRECTIONAL_WINDOWS,
    DEFAULT_RUNTIME,
    DTYPES,
    FIELDS,
    TRAIN_KEYS,
    Runtime,
)
from bidirlm_jax.models.transformer import Transformer
from bidirlm_jax.train.config import base_config, parse_train_args, run_settings

TINY = f"{Path(__file__).resolve().parents[1]}/bidirlm_jax/configs/lm.py:tiny"


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("attention", "sideways", r"attention='sideways' is not one of \('causal', 'bidirectional'\)"),
        ("bidirectional_window", "wide", r"bidirectional_window='wide' is not one of \('half', 'full', 'none'\)"),
        ("dtype", "float8", "dtype='float8' is not one of"),
        ("param_dtype", "int8", "param_dtype='int8' is not one of"),
        ("remat", "some", "remat='some' is not one of"),
        ("attention_impl", "flash", "attention_impl='flash' is not one of"),
        ("attention_block_q", 0, "attention_block_q=0 must be a positive integer"),
        ("attention_block_kv", 1.5, "attention_block_kv=1.5 must be a positive integer"),
        ("scan_layers", "yes", "scan_layers='yes' must be True or False"),
    ],
)
def test_each_bad_setting_is_refused_by_name(setting, value, message):
    with pytest.raises(ConfigError, match=f"invalid run setting: {message}"):
        Runtime(**{setting: value})
    with pytest.raises(ConfigError, match=f"^model.{message}.*; fix --config.model.{setting}$"):
        Runtime.from_settings({setting: value}, prefix="model.")  # as a train config's model section names it


def test_the_architecture_config_holds_no_run_setting():
    assert not set(FIELDS) & {f.name for f in dataclasses.fields(ModelConfig)}
    with pytest.raises(TypeError):
        get_preset("tiny-qwen3", attention="bidirectional")  # the preset describes weights, not how to run them


def test_the_train_config_declares_the_runtime_fields_with_their_defaults():
    """`model.*` run keys are `Runtime`'s (all but the parameter dtype: master weights stay fp32), and what a
    command line sets arrives in the `Runtime` the engine builds; a bad value fails there, naming the key."""
    model = base_config().model
    assert {key: model[key] for key in TRAIN_KEYS} == {key: getattr(DEFAULT_RUNTIME, key) for key in TRAIN_KEYS}
    assert "param_dtype" not in model and run_settings(model) == DEFAULT_RUNTIME
    overrides = ["--config.model.attention=bidirectional", "--config.model.bidirectional_window=full"]
    overrides += ["--config.model.remat=full", "--config.model.attention_block_q=128", "--config.model.dtype=bfloat16"]
    config, _ = parse_train_args(["--config", TINY, "--workdir", "w", *overrides])
    expected = Runtime(
        attention="bidirectional", bidirectional_window="full", remat="full", attention_block_q=128, dtype="bfloat16"
    )
    assert run_settings(config.model) == expected
    with pytest.raises(ConfigError, match="model.attention_block_kv=-1 must be a positive integer"):
        parse_train_args(["--config", TINY, "--workdir", "w", "--config.model.attention_block_kv=-1"])


def test_the_cli_offers_the_declared_choices():
    parser = _build_parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps sub-commands here
    choices = {(name, a.dest): tuple(a.choices) for name, p in commands.items() for a in p._actions if a.choices}
    assert choices[("convert", "attention")] == ATTENTION_MODES
    assert choices[("convert", "bidirectional_window")] == BIDIRECTIONAL_WINDOWS
    assert choices[("convert", "dtype")] == DTYPES
    assert choices[("embed", "attention")] == ATTENTION_MODES


def test_one_runtime_flows_through_from_pretrained_the_model_and_its_export(qwen_dir, tmp_path):
    """The contract's keywords and an explicit `Runtime` build the same model; the model runs as its runtime
    says (scanned, remat, kernel) and an export records the attention mode, which loading reads back."""
    runtime = Runtime(attention="bidirectional", scan_layers=True, remat="full", attention_impl="xla")
    model = bidirlm_jax.from_pretrained(qwen_dir, runtime=runtime)
    assert model.runtime == runtime and "0" not in nnx.state(model)["layers"]  # scanned: stacked layers
    plain = bidirlm_jax.from_pretrained(qwen_dir, attention="bidirectional")
    assert plain.runtime == Runtime(attention="bidirectional")
    ids = np.arange(3, 35, dtype=np.int32).reshape(2, 16)
    # A scan and remat regroup fp32 sums of 64-wide matmuls over O(1) values: a few ulps (fp32_tol(64) ≈ 7.6e-6).
    np.testing.assert_allclose(model(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    half = bidirlm_jax.from_pretrained(qwen_dir, dtype="bfloat16")
    assert half.runtime == Runtime(dtype="bfloat16", param_dtype="bfloat16")  # `dtype`: parameters and compute
    out = bidirlm_jax.save_pretrained(model, tmp_path / "export")
    assert read_runtime(out) == Runtime(attention="bidirectional")  # the one setting an export records
    assert json.loads((out / "config.json").read_text())["is_causal"] is False
    assert bidirlm_jax.from_pretrained(out).runtime.attention == "bidirectional"
    with pytest.raises(ConfigError, match="declare the run settings once"):
        bidirlm_jax.from_pretrained(qwen_dir, attention="causal", runtime=runtime)


def test_a_model_runs_as_its_runtime_says():
    config = get_preset("tiny-gemma3")
    runtime = Runtime(attention="bidirectional", dtype="bfloat16", param_dtype="bfloat16")
    model = Transformer(config, runtime, rngs=nnx.Rngs(0))
    hidden = nnx.jit(lambda m, ids: m.hidden_states(ids))  # one program per model, not one per operation
    assert model.embedder.embedding[...].dtype == np.dtype("bfloat16")
    assert hidden(model, np.ones((1, 12), np.int32)).dtype == np.dtype("bfloat16")
    causal = nnx.merge(nnx.graphdef(Transformer(config, rngs=nnx.Rngs(1))), nnx.state(model))  # same weights
    ids = np.arange(3, 15, dtype=np.int32)[None]
    first = [np.asarray(hidden(m, ids)[0, 0], np.float32) for m in (model, causal)]
    later = ids.copy()
    later[0, -1] += 1  # a later token reaches the first position only bidirectionally
    moved = [np.asarray(hidden(m, later)[0, 0], np.float32) for m in (model, causal)]
    assert np.abs(moved[0] - first[0]).max() > 0 and np.abs(moved[1] - first[1]).max() == 0
