"""`bidirlm merge` reads the project's own outputs directly: a training run (its latest step) and a `bidirlm convert`
checkpoint merge exactly as their HF exports do, with no export first."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from bidirlm_jax.configs import mntp as mntp_configs
from bidirlm_jax.errors import CheckpointError
from bidirlm_jax.io.conversion import convert
from bidirlm_jax.io.hf import save_pretrained
from bidirlm_jax.io.hf_config import read_config
from bidirlm_jax.io.run import model_dir
from bidirlm_jax.io.weights.readers import open_weights
from bidirlm_jax.models.transformer import Transformer
from bidirlm_jax.train import train
from tests.merge.checkpoints import bits, merge, read, run_cli


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A two-step MNTP run of the tiny model, its layers scanned (the train state stacks them)."""
    config = mntp_configs.get_config("tiny")
    config.model.scan_layers = True
    config.data.update(seq_len=32, global_batch_size=8)
    config.train.update(steps=2, checkpoint_every=2, log_every=2)
    config.metrics.update(progress_bar=False, tensorboard=False)
    workdir = tmp_path_factory.mktemp("run") / "run"
    train(config, str(workdir))
    return workdir


@pytest.fixture(scope="module")
def other(tmp_path_factory, run):
    """An HF directory of the same architecture with other weights."""
    config = read_config(model_dir(run))
    return save_pretrained(Transformer(config, rngs=nnx.Rngs(7)), tmp_path_factory.mktemp("other") / "hf")


def _assert_same_tensors(a, b):
    a, b = read(a), read(b)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(bits(a[key]), bits(b[key])), key


def test_merging_a_training_run_equals_merging_its_hf_export(run, other, tmp_path):
    export = convert(run, tmp_path / "export", to="hf")
    assert run_cli("--model", f"{run}=0.5", "--model", f"{other}=0.5", "--out", str(tmp_path / "from-run")) == 0
    (tmp_path / "b").mkdir()
    from_export = merge(tmp_path / "b", [export, other], [0.5, 0.5])
    _assert_same_tensors(tmp_path / "from-run", from_export)
    # the base (the run) gives the output its config and the tokenizer it trained with
    config = json.loads((tmp_path / "from-run" / "config.json").read_text())
    assert config == json.loads((model_dir(run) / "config.json").read_text())
    assert (tmp_path / "from-run" / "tokenizer.json").read_bytes() == (model_dir(run) / "tokenizer.json").read_bytes()


def test_a_run_reads_as_its_export_tensor_for_tensor(run, tmp_path):
    """Keys, shapes, dtypes and values of the run's latest step, as the HF export stores them."""
    export = convert(run, tmp_path / "export", to="hf")
    reader, hf = open_weights(run), open_weights(export)
    assert sorted(reader.keys()) == sorted(hf.keys())
    for key in hf.keys():
        assert reader.info(key).shape == hf.info(key).shape and reader.dtype(key) == hf.dtype(key), key
        np.testing.assert_array_equal(reader.get(key), hf.get(key))
        np.testing.assert_array_equal(reader.read_flat(key, 3, 11), hf.read_flat(key, 3, 11))


def test_merging_a_converted_checkpoint_equals_merging_its_source(other, tmp_path):
    checkpoint = convert(other, tmp_path / "ckpt")
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    _assert_same_tensors(
        merge(tmp_path / "x", [checkpoint, other], [0.3, 0.7]), merge(tmp_path / "y", [other, other], [0.3, 0.7])
    )
    assert not (tmp_path / "x" / "out" / "params").exists()  # the checkpoint's orbax weights are not copied


def test_a_fine_tuning_run_is_refused_with_what_to_do(tmp_path):
    run = tmp_path / "finetune"
    (run / "checkpoints").mkdir(parents=True)
    (run / "model").mkdir()
    (run / "model" / "config.json").write_text("{}")
    (run / "model" / "head.json").write_text("{}")
    with pytest.raises(CheckpointError, match="fine-tuning run .*`bidirlm export"):
        open_weights(run)
