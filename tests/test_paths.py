"""`~` in every user path (`bidirlm_jax.paths.user_path`): bash leaves it alone after `--flag=` and in config
values, so each entry point is run here with HOME set to a temporary directory and `~/...` paths."""

import numpy as np
import pytest
from ml_collections import ConfigDict

import bidirlm_jax
from bidirlm_jax import configs
from bidirlm_jax.cli import main
from bidirlm_jax.data.sources import source_files
from bidirlm_jax.io.sentence_transformers import read_encoder_settings
from bidirlm_jax.io.tokenizer import load_tokenizer
from bidirlm_jax.train.config import base_config, parse_train_args
from bidirlm_jax.train.loop import model_config
from bidirlm_jax.train.objectives.base import run_tokenizer
from tests.encoders import make_encoder_src


@pytest.fixture
def home(tmp_path, monkeypatch, qwen_dir):
    """HOME is a temporary directory holding `base/` (a tiny Qwen3 with its tokenizer) and `texts.txt`;
    the working directory is elsewhere, so nothing resolves by accident."""
    home = tmp_path / "home"
    make_encoder_src(qwen_dir, home / "base")
    (home / "texts.txt").write_text("the quick brown fox\na lazy dog\n")
    monkeypatch.setenv("HOME", str(home))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return home


def test_python_entry_points(home):
    assert bidirlm_jax.from_pretrained("~/base").config == bidirlm_jax.from_pretrained(home / "base").config
    assert bidirlm_jax.param_count("~/base") == bidirlm_jax.param_count(home / "base")
    assert load_tokenizer("~/base").vocab_size == load_tokenizer(home / "base").vocab_size
    assert source_files("~/texts.txt") == [home / "texts.txt"]


def test_config_paths(home):
    model = ConfigDict(base_config().model.to_dict())
    model.init_from = "~/base"
    assert model_config(model).num_layers == bidirlm_jax.from_pretrained(home / "base").config.num_layers
    config = base_config()
    config.data.update(tokenizer="~/base", source="text")
    tokenizer = run_tokenizer(config, bidirlm_jax.from_pretrained(home / "base").config, home / "run")
    assert tokenizer.vocab_size == load_tokenizer(home / "base").vocab_size
    _, workdir = parse_train_args(["--config", configs.resolve("lm:tiny"), "--workdir=~/run"])
    assert workdir == str(home / "run")


def test_cli_paths(home, capsys):
    assert main(["export", "~/base", "~/encoder"]) == 0
    assert read_encoder_settings(home / "encoder").pooling == "mean"
    assert main(["embed", "--model=~/encoder", "--input=~/texts.txt", "--output=~/e.npy"]) == 0
    assert np.load(home / "e.npy").shape[0] == 2
    assert main(["merge", "--model=~/base=1", "--model=~/encoder=1", "--out=~/merged", "--no-progress"]) == 0
    assert (home / "merged" / "config.json").is_file()
    assert main(["convert", "~/merged", "~/ckpt"]) == 0
    assert bidirlm_jax.param_count("~/ckpt") == bidirlm_jax.param_count(home / "base")
    assert not any(p.name == "~" for p in (home.parent / "cwd").iterdir())  # nothing written to a literal "~"
