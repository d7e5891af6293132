"""The composition study (`bidirlm ablate --config configs/specialists.py`): the EMA smoothing and the layer-wise
cosine similarity against numpy; merges keyed by their inputs' files; bad inputs refused with one line, exit 2
and nothing written; and the tiny preset end to end (table, learning curves and ratio plot from the run, a second
call reusing every cell, a changed specialist recomputing its cells)."""

import json

import numpy as np
import pytest

from bidirlm_jax.ablation.composition import parse_settings, parse_test_sets, run_composition
from bidirlm_jax.ablation.curves import ema
from bidirlm_jax.ablation.specialists import build_merge
from bidirlm_jax.cli import main
from bidirlm_jax.configs import finetune
from bidirlm_jax.configs.specialists import PAPER_PRESETS, get_config
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.hf_config import read_runtime
from bidirlm_jax.merge.similarity import layer_cosine_similarity
from bidirlm_jax.pipeline.timer import Timer
from tests.merge.checkpoints import hf_template, random, tokenizer, vl, write

SILENT = Timer(echo=lambda _: None)


@pytest.fixture(scope="module")
def qwen():
    return hf_template("qwen3")


@pytest.fixture(scope="module")
def models(tmp_path_factory, qwen):
    """An encoder, a specialist close to it, another specialist, a Qwen3-VL specialist holding the encoder's
    backbone and one whose MLP is narrower: tiny random Qwen3 checkpoints with a tokenizer."""
    config, shapes = qwen
    root = tmp_path_factory.mktemp("models")
    encoder = random(shapes, 0)
    noise = random(shapes, 1, scale=0.3)
    out = {
        "encoder": write(root / "encoder", encoder, config),
        "specialist": write(root / "specialist", {k: v + noise[k] for k, v in encoder.items()}, config),
        "other": write(root / "other", random(shapes, 2), config),
        "vl": vl(root / "vl", qwen, 0),
    }
    narrow_config, narrow_shapes = hf_template("qwen3", intermediate_size=96)
    out["narrow"] = write(root / "narrow", random(narrow_shapes, 3), narrow_config)
    for path in out.values():
        tokenizer(path)
    return out, encoder, {k: v + noise[k] for k, v in encoder.items()}


def test_ema_is_the_papers_smoothing():
    x = np.random.default_rng(0).standard_normal(12)
    alpha = 0.4
    t = np.arange(len(x))
    weights = alpha * (1 - alpha) ** (t[:, None] - t[None, :]) * (t[:, None] >= t[None, :])
    weights[:, 0] = (1 - alpha) ** t  # the first point starts the average
    np.testing.assert_allclose(ema(x, alpha), weights @ x, rtol=1e-12)
    assert ema(x, 1.0) == pytest.approx(list(x))
    with pytest.raises(ConfigError, match="alpha"):
        ema(x, 0.0)


def test_layer_cosine_similarity_matches_numpy(models):
    paths, a, b = models
    got = layer_cosine_similarity(paths["encoder"], paths["specialist"])
    want = []
    for layer in range(2):
        keys = sorted(k for k in a if k.startswith(f"model.layers.{layer}.") and (".self_attn." in k or ".mlp." in k))
        x = np.concatenate([a[k].ravel() for k in keys]).astype(np.float64)
        y = np.concatenate([b[k].ravel() for k in keys]).astype(np.float64)
        want.append(x @ y / np.linalg.norm(x) / np.linalg.norm(y))
    np.testing.assert_allclose(got["layers"], want, rtol=1e-12)
    assert got["mean"] == pytest.approx(np.mean(want), rel=1e-12)
    assert 0.9 < got["mean"] < 1.0
    # a Qwen3-VL specialist's backbone (under model.language_model.) is matched to the text encoder's
    assert layer_cosine_similarity(paths["encoder"], paths["vl"])["layers"] == pytest.approx([1.0, 1.0], abs=1e-12)


def test_a_foreign_backbone_is_refused_by_name(models):
    paths = models[0]
    with pytest.raises(ConfigError, match=r"layers\.0\.mlp\.down_proj\.weight: \(64, 128\) in .*\(64, 96\)"):
        layer_cosine_similarity(paths["encoder"], paths["narrow"])


def test_merges_are_keyed_by_their_inputs_files(models, tmp_path):
    paths = models[0]
    first, provenance = build_merge(paths["encoder"], paths["specialist"], 0.5, tmp_path, SILENT)
    again, _ = build_merge(paths["encoder"], paths["specialist"], 0.5, tmp_path, SILENT)
    other, other_provenance = build_merge(paths["encoder"], paths["other"], 0.5, tmp_path, SILENT)
    assert first == again and first != other
    assert provenance["encoder"] == other_provenance["encoder"]
    assert provenance["specialist"] != other_provenance["specialist"]
    assert read_runtime(first).attention == "bidirectional"
    # the Qwen3-VL specialist gives the merge its layout and carries its vision tower
    merged, _ = build_merge(paths["encoder"], paths["vl"], 0.25, tmp_path, SILENT)
    index = (merged / "model.safetensors").read_bytes()[:20_000]
    assert b"model.visual.patch_embed.proj.weight" in index and b"model.language_model.layers.0" in index


def test_test_sets_are_named_data_with_a_split():
    assert parse_test_sets("safe=/d/safe.jsonl; aegis=hf:org/aegis-2.0@validation") == {
        "safe": ("/d/safe.jsonl", "test"),
        "aegis": ("hf:org/aegis-2.0", "validation"),
    }
    for bad in ("safe", "validation=x", "1x=y", "a=x;a=y", "a=@test"):
        with pytest.raises(ConfigError, match="NAME=DATA"):
            parse_test_sets(bad)


def test_task_settings_take_the_presets_types():
    template = finetune.get_config("xnli")
    got = parse_settings("data.path=hf:x/y; data.seq_len=512;finetune.pack=true;optim.learning_rate=1e-4", template)
    assert got == {"data.path": "hf:x/y", "data.seq_len": 512, "finetune.pack": True, "optim.learning_rate": 1e-4}
    with pytest.raises(ConfigError, match="data.sequence_length"):
        parse_settings("data.sequence_length=3", template)
    with pytest.raises(ConfigError, match="takes a int"):
        parse_settings("data.seq_len=long", template)
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        parse_settings("data.seq_len", template)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--config=configs/specialists.py:nope"], "unknown preset 'nope'"),
        (["--config=configs/specialists.py:safety"], "no encoder: set --config.encoder=HF_DIR"),
        (["--config=configs/specialists.py:tiny", "--config.ratios=0,1.5"], "outside [0, 1]"),
        (["--config=configs/specialists.py:tiny", "--config.task.settings=data.srouce=x"], "data.srouce"),
    ],
)
def test_bad_inputs_exit_2_and_write_nothing(tmp_path, capsys, flags, message):
    work = tmp_path / "work"
    assert main(["ablate", *flags, f"--workdir={work}"]) == 2
    assert message in capsys.readouterr().err
    assert not work.exists()


def test_a_specialist_of_another_backbone_exits_2_naming_the_tensor(models, tmp_path, capsys):
    paths, work = models[0], tmp_path / "work"
    flags = [f"--config.encoder={paths['encoder']}", f"--config.specialist={paths['narrow']}"]
    assert main(["ablate", "--config=configs/specialists.py:tiny", f"--workdir={work}", *flags]) == 2
    assert "layers.0.mlp.down_proj.weight" in capsys.readouterr().err
    assert not work.exists()


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_paper_presets_name_the_papers_settings(preset):
    c = get_config(preset)
    assert (c.finetune.steps, c.merge_ratio, c.ratios) == (500, 0.5, "0,0.25,0.5,0.75,1")
    assert c.finetune.batch_size == {"safety": 4, "vision": 32, "audio": 14}[preset]
    assert c.task.preset == {"safety": "xnli", "vision": "esnli-ve", "audio": "boolq-audio"}[preset]


def _small(**changes):
    """The tiny preset cut to a few steps and three variants (the whole preset takes minutes)."""
    c = get_config("tiny")
    c.generate.update(lm_steps=4, max_eval_queries=40)
    c.mntp.train.update(steps=3, checkpoint_every=3, log_every=1)
    c.adapt.update(steps=4, examples=128)
    c.finetune.update(steps=6, eval_every=2, synthetic_train_size=64, synthetic_validation_size=32)
    c.ratios = "0,0.5,1"
    c.task.test_sets = "heldout=generated"  # a generated task's test set is its validation split again
    for key, value in changes.items():
        section, leaf = key.split(".")
        c[section][leaf] = value
    return c


@pytest.mark.slow
def test_the_tiny_preset_end_to_end(tmp_path):
    work = tmp_path / "study"
    first = run_composition(_small(), work, echo=None)
    names = ["Bi+MNTP", "Merge 0.5", "Bi+Specialist"]
    assert [row["variant"] for row in first.rows] == names and first.computed == names
    for row in first.rows:  # the row is the run's: its curve is the run's validations, its score their best
        run = work / "cells" / next(p.stem for p in (work / "cells").glob("*.json") if row["variant"] in p.read_text())
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        curve = [[r["step"], r["eval/accuracy"]] for r in logged if "eval/accuracy" in r]
        assert row["curve"] == curve and [s for s, _ in curve] == [2, 4, 6]
        assert row["score"] == max(v for _, v in curve) and row["final"] == curve[-1][1]
        assert [[r["step"], r["eval/heldout/accuracy"]] for r in logged if "eval/heldout/accuracy" in r] == curve
        assert row["test_scores"] == {"heldout": row["score"]}  # at the validation's best step
    table = (work / "results.md").read_text()
    assert f"{100 * first.rows[1]['score']:.1f}" in table and f"{first.similarity['mean']:.4f}" in table
    assert "heldout at best |" in table
    assert 0.5 < first.similarity["mean"] < 1.0 and len(first.similarity["layers"]) == 2
    for png in (first.curves_png, first.ratio_png):
        assert png.read_bytes().startswith(b"\x89PNG")

    again = run_composition(_small(), work, echo=None)
    assert again.computed == [] and again.reused == names and again.rows == first.rows

    changed = run_composition(_small(**{"adapt.seed": 2}), work, echo=None)  # another specialist
    assert changed.computed == names
    assert changed.similarity != first.similarity
    assert len(list((work / "cells").glob("*.json"))) == 6  # the first specialist's cells stay, reusable
