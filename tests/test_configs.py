"""The packaged configs: found by name from any directory, listed in `train --help`, and each paper preset's
documented one-CPU smoke recipe valid (config checks, batch split, warmup, abstract model)."""

import logging
import re
from pathlib import Path

import pytest

from bidirlm_jax import configs
from bidirlm_jax.cli import main
from bidirlm_jax.io.params import param_count
from bidirlm_jax.sharding import mesh_shape
from bidirlm_jax.train.config import parse_train_args
from bidirlm_jax.train.loop import model_config
from bidirlm_jax.train.preflight import plan_batch

README = Path(__file__).resolve().parents[1] / "README.md"
PAPER_PRESETS = ("gemma3-270m", "qwen3-0.6b", "gemma3-1b", "qwen3-1.7b")


@pytest.mark.parametrize("spec", ["mntp:qwen3-0.6b", "configs/mntp.py:qwen3-0.6b"])
def test_a_packaged_config_loads_from_another_directory(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    config, workdir = parse_train_args(configs.resolve_args(["--config", spec, f"--workdir={tmp_path / 'run'}"]))
    assert config.objective == "mntp" and config.model.preset == "qwen3-0.6b"
    assert workdir == str(tmp_path / "run")


def test_a_config_file_path_keeps_working(tmp_path, monkeypatch):
    own = tmp_path / "mine.py"
    own.write_text("from bidirlm_jax.configs.lm import get_config\n")
    monkeypatch.chdir(tmp_path)
    config, _ = parse_train_args(configs.resolve_args(["--config=mine.py:bench", "--workdir=w"]))
    assert config.model.preset == "bench-qwen3"


def test_train_help_lists_configs_and_presets(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for name in ("lm", "mntp", "contrastive"):
        line = next(line for line in out.splitlines() if line.split()[:1] == [name])
        assert all(preset in line for preset in ("tiny", *PAPER_PRESETS)), line
    assert "(bidirlm ablate)" in next(line for line in out.splitlines() if line.split()[:1] == ["ablation"])


def test_the_cli_resolves_a_name_and_suggests_a_mistyped_key(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["train", "--config", "mntp:tiny", f"--workdir={tmp_path / 'run'}", "--config.train.stpes=2"]
    assert main(args) == 2
    assert "did you mean 'train.steps'?" in capsys.readouterr().err
    args[-1] = "--config.trian.steps=2"
    assert main(args) == 2
    assert "did you mean 'train.steps'?" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _smoke_config(name: str, preset: str, tmp_path: Path):
    argv = ["--config", f"{name}:{preset}", f"--workdir={tmp_path}", *configs.SMOKE[name]]
    return parse_train_args(configs.resolve_args(argv))[0]


@pytest.mark.parametrize("preset", PAPER_PRESETS)
@pytest.mark.parametrize("name", sorted(configs.SMOKE))
def test_each_paper_preset_has_a_valid_one_cpu_smoke_recipe(name, preset, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        config = _smoke_config(name, preset, tmp_path)
    assert not caplog.records, [r.getMessage() for r in caplog.records]  # no warmup-longer-than-run warning
    one_cpu = mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, 1)
    plan = plan_batch(config, one_cpu)  # raises if the global batch does not split into the preset's micro-batches
    assert config.data.global_batch_size % plan.grad_accum_steps == 0
    model = model_config(config.model)
    assert model.num_layers > 4 and param_count(model) > 2e8  # the preset's real model, built abstractly


def test_the_readme_documents_each_smoke_recipe():
    text = README.read_text().replace("\\\n", " ")
    for name, overrides in configs.SMOKE.items():
        command = next(line for line in text.splitlines() if f"--config {name}:" in line and "smoke" in line)
        assert set(re.findall(r"--config\.\S+", command)) == set(overrides), name


def test_a_short_run_names_the_micro_batch_keys(tmp_path, capsys):
    args = ["train", "--config=mntp:gemma3-270m", f"--workdir={tmp_path / 'run'}", "--config.data.global_batch_size=2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    for key in ("data.global_batch_size=2", "train.grad_accum_steps=3", "train.max_rows_per_device=8", "mesh.data"):
        assert key in err, err
    assert "warmup" not in err  # the preset's own run is longer than its warmup


def test_a_warmup_longer_than_the_run_is_warned_of(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        parse_train_args(configs.resolve_args(["--config=lm:tiny", "--workdir=w", "--config.train.steps=5"]))
    assert "optim.warmup_steps=10" in caplog.text and "train.steps=5" in caplog.text
