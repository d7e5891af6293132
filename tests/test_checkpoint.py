"""io/checkpoint.py: the orbax checkpoint — what it records, damaged files, and saving from two processes."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import bidirlm_jax
from bidirlm_jax.cli import main
from bidirlm_jax.errors import CheckpointError
from bidirlm_jax.io.checkpoint import load_checkpoint, recorded_dtypes, save_checkpoint
from tests import cluster

WORKER = Path(__file__).with_name("two_process_save.py")


def _params(model) -> dict:
    return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_the_source_dtypes_are_recorded(qwen_dir, tmp_path):
    model = bidirlm_jax.from_pretrained(qwen_dir)
    tensor_dtypes = {"embed_tokens.weight": "bfloat16", "norm.weight": "float32"}
    save_checkpoint(model, tmp_path / "ckpt", dtype="bfloat16", tensor_dtypes=tensor_dtypes)
    assert recorded_dtypes(tmp_path / "ckpt") == ("bfloat16", {"norm.weight": "float32"})
    save_checkpoint(model, tmp_path / "plain")
    assert recorded_dtypes(tmp_path / "plain") == ("float32", {})
    assert (
        "bidirlm_tensor_dtypes"
        not in bidirlm_jax.save_pretrained(model, tmp_path / "hf").joinpath("config.json").read_text()
    )


def test_a_damaged_checkpoint_raises_a_checkpoint_error(qwen_dir, tmp_path, capsys):
    save_checkpoint(bidirlm_jax.from_pretrained(qwen_dir), tmp_path / "ckpt")
    data = max((tmp_path / "ckpt" / "params").rglob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:100])  # a copy cut short
    with pytest.raises(CheckpointError, match="cannot restore .* damaged"):
        load_checkpoint(tmp_path / "ckpt")
    assert main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot restore" in err and "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_processes_save_what_one_process_saves(gemma_dir, tmp_path):
    """A model no process holds whole, saved by both processes: the same checkpoint and export as one process."""
    commands = lambda port: [
        [sys.executable, str(WORKER), str(port), str(i), str(gemma_dir), str(tmp_path / "two")] for i in range(2)
    ]
    cluster.check(cluster.run_cluster(commands, env={}))
    one = bidirlm_jax.from_pretrained(gemma_dir)
    save_checkpoint(one, tmp_path / "one" / "ckpt")
    bidirlm_jax.save_pretrained(one, tmp_path / "one" / "hf")
    assert sorted(os.listdir(tmp_path / "two")) == ["ckpt", "hf"]  # no temporary left behind
    for name in ("hf/model.safetensors", "hf/config.json", "ckpt/config.json"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    two, expected = _params(load_checkpoint(tmp_path / "two" / "ckpt")), _params(one)
    assert two.keys() == expected.keys()
    for path, array in expected.items():
        assert two[path].tobytes() == array.tobytes(), path
