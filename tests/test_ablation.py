"""`bidirlm ablate` / `run_ablation`: one tiny run shared by the module (every variant, a sequence task and the
generated retrieval task, a few steps each) gives the table and both plots with numbers from the run; a second
call recomputes nothing; bad inputs are refused with one line, exit 2 and nothing written; the merge-ratio
sweep's ends are its two sources exactly and its interior ratios numpy's mixtures."""

import json
import os

import numpy as np
import pytest

from bidirlm_jax.ablation import report
from bidirlm_jax.ablation.harness import run_ablation
from bidirlm_jax.ablation.sweep import merge_ratio_sweep, mix
from bidirlm_jax.cli import main
from bidirlm_jax.configs.ablation import get_config
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.testing.tolerance import ulps

FIVE = ["Base", "Bi+Base", "Bi+MNTP", "Bi+Contrastive", "Bi+MNTP+Contrastive"]


def _small(**changes):
    """The tiny preset cut to a few steps and two tasks (the whole preset takes minutes)."""
    c = get_config("tiny")
    c.generate.update(lm_steps=4, max_eval_queries=40)
    for t in (c.mntp, c.contrastive):
        t.train.update(steps=3, checkpoint_every=3, log_every=1)
    c.tasks = "fruit,docstrings"
    c.finetune.update(steps=6, eval_every=6, synthetic_train_size=64, synthetic_validation_size=32)
    c.retrieval.update(steps=3)
    c.sweep.update(ratios="0,0.5,1", max_texts=16)
    for key, value in changes.items():
        node = c
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return c


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    work = tmp_path_factory.mktemp("ablation") / "run"
    return work, run_ablation(_small(), work, echo=None)


def test_the_table_and_both_plots_hold_the_runs_numbers(ablation):
    work, result = ablation
    assert [(r["variant"], r["task"]) for r in result.rows] == [(v, t) for v in FIVE for t in ("fruit", "docstrings")]
    rows = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()]
    assert rows == json.loads(json.dumps(result.rows))
    for row in rows:  # each score is the one its run recorded
        cell = json.loads((work / "cells" / report_slug(row["variant"]) / f"{row['task']}.json").read_text())
        assert cell["row"]["score"] == row["score"] and 0.0 <= row["score"] <= 1.0
        if row["task"] == "fruit":
            best = json.loads(
                (work / "cells" / report_slug(row["variant"]) / "fruit" / "best" / "best.json").read_text()
            )
            assert best["metrics"]["accuracy"] == row["score"]
    assert {r["attention"] for r in rows if r["variant"] == "Base"} == {"causal"}
    markdown = (work / "results.md").read_text()
    assert markdown.strip() == result.markdown.strip()
    base = next(r["score"] for r in rows if r["variant"] == "Base" and r["task"] == "docstrings")
    other = next(r["score"] for r in rows if r["variant"] == "Bi+MNTP" and r["task"] == "docstrings")
    assert f"{100 * other:.1f} ({100 * (other - base):+.1f})" in markdown
    for png in (result.deltas_png, result.sweep_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p["ratio"] for p in result.sweep] == [0.0, 0.5, 1.0]
    assert all(0.0 <= p["masked_accuracy"] <= 1.0 and np.isfinite(p["loss"]) for p in result.sweep)
    assert json.loads((work / "merge_ratio.json").read_text())["points"] == result.sweep
    assert len(result.computed) == 10 and not result.reused


def report_slug(variant):
    from bidirlm_jax.ablation.harness import SLUGS

    return SLUGS[variant]


def test_a_second_run_recomputes_nothing(ablation, capsys):
    work, _ = ablation
    before = {p: p.stat().st_mtime_ns for p in (work / "cells").rglob("*") if p.is_file()}
    before |= {p: p.stat().st_mtime_ns for p in (work / "variants").rglob("*") if p.is_file()}
    sweep = (work / "merge_ratio.json").stat().st_mtime_ns
    again = run_ablation(_small(), work, echo=None)
    assert again.computed == [] and len(again.reused) == 10
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before and (work / "merge_ratio.json").stat().st_mtime_ns == sweep
    # a cell recorded with other settings is refused by name, not silently reused
    with pytest.raises(ConfigError, match="fruit cell made with other settings"):
        run_ablation(_small(**{"finetune.learning_rate": 1e-4}), work, echo=None)


def test_the_sweep_ends_are_the_two_sources(ablation):
    from flax import nnx

    from bidirlm_jax.io.hf import from_pretrained

    work = ablation[0]
    adapted, base = work / "variants" / "bi-mntp", work / "generated" / "base"

    def params(path):
        return nnx.state(from_pretrained(path, attention="bidirectional"), nnx.Param)

    a, b = params(adapted), params(base)
    for ratio, source in ((0.0, a), (1.0, b)):
        mixed = mix(a, b, ratio)
        for x, y in zip(nnx.to_flat_state(mixed), nnx.to_flat_state(source)):
            np.testing.assert_array_equal(np.asarray(x[1][...]), np.asarray(y[1][...]))
    seen = []

    def record(model):
        seen.append([np.asarray(x[...]) for _, x in nnx.to_flat_state(nnx.state(model, nnx.Param))])
        return {"first": 0.0}

    # Interior ratios, on both sides of ½ (each side interpolates from its nearer end), against numpy in
    # float64: r·base + (1 − r)·adapted. fp32 a + α(b − a) rounds three times at the operands' scale.
    ratios = [0.0, 0.25, 0.75, 1.0]
    points = merge_ratio_sweep(adapted, base, record, ratios=ratios)
    assert [p["ratio"] for p in points] == ratios and len(seen) == 4
    pairs = [(np.asarray(x[...], np.float64), np.asarray(y[...], np.float64)) for (_, x), (_, y) in
             zip(nnx.to_flat_state(a), nnx.to_flat_state(b), strict=True)]  # fmt: skip
    for ratio, mixed in zip(ratios, seen):
        for (x, y), m in zip(pairs, mixed, strict=True):
            expected = ratio * y + (1 - ratio) * x
            assert (np.abs(m - expected) <= ulps(np.maximum(np.abs(x), np.abs(y)), 3)).all(), ratio
    assert any(not np.allclose(u, v) for u, v in zip(seen[1], seen[2]))  # the sources differ, so do the ratios


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--config.tasks=fruit,nope"], "unknown task(s) ['nope']"),
        (["--config.paths.bi_mntp={tmp}"], "paths.bi_mntp="),
        (["--config.nope=1"], "unknown config key 'nope'"),
        (["--config.finetune.nope=1"], "unknown config key 'finetune.nope'"),
        (["--config.variants=Bi+MNTP"], "must include Base"),
        (["--config.variants=Base,Bi+Nope"], "unknown variant(s) ['Bi+Nope']"),
        (["--config.sweep.ratios=0,1.5"], "outside [0, 1]"),
        (["--config.base="], "no base model"),
    ],
)
def test_bad_inputs_exit_2_and_write_nothing(tmp_path, capsys, flags, message):
    work = tmp_path / "out"
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    assert main(["ablate", "--config", "configs/ablation.py:tiny", "--workdir", str(work), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == []


def test_an_output_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["ablate", "--config", "configs/ablation.py:tiny", "--workdir", str(tmp_path / "file" / "out")]) == 2
    assert "which is a file" in capsys.readouterr().err
    assert main(["ablate", "--config", "configs/ablation.py:tiny", "--workdir", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err and (tmp_path / "file").read_text() == "x"


def test_paper_presets_name_the_datasets_and_need_their_files(tmp_path):
    for preset in ("gemma3-270m", "qwen3-0.6b"):
        c = get_config(preset)
        assert c.tasks.split(",") == ["miracl", "xnli", "seahorse", "pan-x"]
        assert c.mntp.objective == "mntp" and c.contrastive.objective == "contrastive"
    c = get_config("gemma3-270m")
    c.base = str(tmp_path)
    with pytest.raises(ConfigError, match="base="):
        run_ablation(c, tmp_path / "out", echo=None)
    from bidirlm_jax.ablation.tasks import TASKS, finetune_config

    xnli = finetune_config(TASKS["xnli"], c.finetune, c.task_paths)
    assert xnli.data.path == "hf:facebook/xnli:en" and xnli.data.global_batch_size == 32
    assert finetune_config(TASKS["pan-x"], c.finetune, c.task_paths).data.path == "hf:google/xtreme:PAN-X.en"
    with pytest.raises(ConfigError, match="task_paths.seahorse_train"):
        finetune_config(TASKS["seahorse"], c.finetune, c.task_paths)


def test_sequence_cells_use_the_authors_head_by_default():
    """Figure 2's rows fine-tune the authors' released head (dense → GELU → classifier); token tasks keep theirs."""
    from bidirlm_jax.ablation.tasks import TASKS, finetune_config

    for preset in ("tiny", "gemma3-270m"):
        c = get_config(preset)
        assert c.finetune.classifier == "eurobert"
        for name in ("fruit", "sentiment", "xnli"):
            assert finetune_config(TASKS[name], c.finetune, c.task_paths).finetune.classifier == "eurobert"
        for name in ("names", "pan-x"):
            assert finetune_config(TASKS[name], c.finetune, c.task_paths).finetune.classifier == "auto"
        c.finetune.classifier = "linear"
        assert finetune_config(TASKS["fruit"], c.finetune, c.task_paths).finetune.classifier == "linear"


def test_markdown_table_deltas():
    rows = [
        {"variant": "Base", "attention": "causal", "task": "t", "metric": "accuracy", "score": 0.5},
        {"variant": "Bi+MNTP", "attention": "bidirectional", "task": "t", "metric": "accuracy", "score": 0.625},
    ]
    lines = report.markdown_table(rows).splitlines()
    assert lines[0] == "| variant | attention | t (accuracy) |"
    assert lines[2] == "| Base | causal | 50.0 |" and lines[3] == "| Bi+MNTP | bidirectional | 62.5 (+12.5) |"
