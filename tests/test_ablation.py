"""`bidirlm ablate` / `run_ablation`: one tiny run shared by the module (every variant, a sequence task and the
generated retrieval task, a few steps each; preempted once in its first cell, then resumed) gives the table and
both plots with numbers from the run; a second call recomputes nothing; a cell or sweep made from an older build
of its variant is refused; mteb cells are named by their weights and instructed as they were trained; bad inputs
are refused with one line, exit 2 and nothing written; the merge-ratio sweep's ends are its two sources exactly
and its interior ratios numpy's mixtures."""

import json
import os
import shutil

import numpy as np
import pytest

from bidirlm_jax.ablation import report
from bidirlm_jax.ablation.harness import run_ablation
from bidirlm_jax.ablation.sweep import merge_ratio_sweep, mix
from bidirlm_jax.cli import main
from bidirlm_jax.configs.ablation import get_config
from bidirlm_jax.errors import ConfigError, Preempted
from bidirlm_jax.testing.tolerance import ulps
from tests.runs import sigterm_at

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
def preempted(tmp_path_factory):
    """The module's run, first stopped by SIGTERM at step 3 of its first cell (`ablation` resumes it): the
    exception, what `cells/base/` held then, the run's last checkpoint and logged rows, and whether a table
    was written."""
    from bidirlm_jax.train.checkpoints import latest_step

    work = tmp_path_factory.mktemp("ablation") / "run"
    run = work / "cells" / "base" / "fruit"
    with pytest.MonkeyPatch.context() as m:
        sigterm_at(m, step=3, run=run)
        with pytest.raises(Preempted) as stop:
            run_ablation(_small(), work, echo=None)
    cells = sorted(os.listdir(work / "cells" / "base"))
    rows = (run / "metrics.jsonl").read_text().splitlines()
    return work, stop.value, cells, latest_step(run / "checkpoints"), rows, (work / "results.jsonl").exists()


@pytest.fixture(scope="module")
def ablation(preempted):
    work = preempted[0]
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
    from bidirlm_jax.ablation.cells import SLUGS

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


def test_a_preempted_cell_records_nothing_and_is_resumed(preempted, ablation):
    """SIGTERM in the first cell's run: its checkpoint is kept, no score is recorded, the next cell is not
    started and no table is written; the next call resumes that run (its first steps are not trained again)."""
    work, stop, cells, step, first, table = preempted
    run = work / "cells" / "base" / "fruit"
    assert stop.workdir == run and f"after step 3; nothing was recorded: checkpoint saved in {run}" in str(stop)
    assert cells == ["fruit"] and step == 3 and not table
    assert [json.loads(line)["step"] for line in first] == [1, 2, 3]
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert rows[:3] == first and [json.loads(line)["step"] for line in rows] == [1, 2, 3, 4, 5, 6]
    assert json.loads((work / "cells" / "base" / "fruit.json").read_text())["row"]["step"] == 6


def test_a_preempted_ablation_exits_as_train_does(monkeypatch, capsys, tmp_path):
    from bidirlm_jax.ablation import harness

    def preempted(config, workdir):
        raise Preempted(tmp_path / "cells" / "base" / "fruit", 3)

    monkeypatch.setattr(harness, "run_ablation", preempted)
    assert main(["ablate", "--config", "configs/ablation.py:tiny", "--workdir", str(tmp_path)]) == 0
    assert capsys.readouterr().err == (
        f"stopped by SIGTERM after step 3; nothing was recorded: checkpoint saved in {tmp_path}/cells/base/fruit — "
        "run the same command again to resume\n"
    )


def _copy(src, work, *parts):
    for part in parts:
        (work / part).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (src / part).is_dir() else shutil.copy2)(src / part, work / part)


def _header(safetensors: bytes) -> bytes:
    """A safetensors file's header: tensor names, dtypes, shapes and offsets."""
    return safetensors[: 8 + int.from_bytes(safetensors[:8], "little")]


def test_cells_and_sweep_of_a_rebuilt_variant_are_refused(ablation, tmp_path):
    """Bi+MNTP's weights replaced as a rebuild (or a retraining into a given directory) replaces them — same
    tensor names, shapes and offsets, other values: its finished cell, its interrupted run and the sweep are
    refused by name, not reused or resumed; with its files back, everything is reused or resumed as it was."""
    src, work = ablation[0], tmp_path / "run"
    _copy(src, work, "generated", "variants/bi-mntp", "variants/bi-contrastive", "cells/base", "cells/bi-mntp")
    _copy(src, work, "merge_ratio.json")
    given = {"paths.bi_mntp": str(work / "variants" / "bi-mntp")}  # the copy's variant, at the path recorded
    small = dict(variants="Base,Bi+MNTP", tasks="fruit", **given)
    copied = run_ablation(_small(**small), work, echo=None)  # a copy (new files, same bytes) is the same ablation
    assert copied.computed == [] and copied.reused == ["Base / fruit", "Bi+MNTP / fruit"]

    weights = work / "variants" / "bi-mntp" / "model.safetensors"
    original = weights.read_bytes()
    shutil.copyfile(work / "variants" / "bi-contrastive" / "model.safetensors", weights)
    assert _header(weights.read_bytes()) == _header(original) and weights.read_bytes() != original
    with pytest.raises(ConfigError, match=r"bi-mntp/fruit.json holds the Bi\+MNTP / fruit cell made with other "):
        run_ablation(_small(**small), work, echo=None)
    with pytest.raises(ConfigError, match=r"variant.files: '[0-9a-f]{16}' then, '[0-9a-f]{16}' now"):
        run_ablation(_small(**small), work, echo=None)
    (work / "cells" / "bi-mntp" / "fruit.json").unlink()  # its run stays, as an interrupted one would
    with pytest.raises(ConfigError, match=r"bi-mntp/fruit holds an interrupted run of the Bi\+MNTP / fruit cell"):
        run_ablation(_small(**small), work, echo=None)
    with pytest.raises(
        ConfigError, match=r"merge_ratio.json holds a merge-ratio sweep made with other .*adapted_files"
    ):
        run_ablation(_small(variants="Base", tasks="fruit", **given), work, echo=None)

    weights.write_bytes(original)
    again = run_ablation(_small(**small), work, echo=None)
    assert again.computed == ["Bi+MNTP / fruit"]  # the finished run resumed at its end, its best score read back
    assert again.rows == [json.loads((src / f"cells/{v}/fruit.json").read_text())["row"] for v in ("base", "bi-mntp")]


def _fake_run_mteb(seen):
    """`evals.mteb.run_mteb` without MIRACL's data (none offline): notes each encoder's revision and the
    instruction it gives MIRACL's queries, under the variant's slug."""
    import mteb
    from mteb.types import PromptType

    miracl = mteb.get_task("MIRACLRetrievalHardNegatives").metadata

    def run_mteb(encoder, tasks, *, cache_dir=None):
        meta = encoder.mteb_model_meta
        slug = meta.name.split("/")[1]
        seen.setdefault(slug, []).append((meta.revision, encoder.instruction(miracl, PromptType.query)))
        return {tasks[0]: {"main_score": 0.5}}

    return run_mteb


@pytest.fixture(scope="module")
def miracl(ablation, tmp_path_factory):
    """MIRACL zero-shot (`retrieval.steps=0`) for three variants, in a copy of the module's run: its workdir,
    config and what mteb was asked."""
    pytest.importorskip("mteb")
    from bidirlm_jax.evals import mteb as adapter

    work, seen = tmp_path_factory.mktemp("miracl") / "run", {}
    _copy(ablation[0], work, "generated", "variants/bi-mntp", "variants/bi-contrastive")
    config = _small(
        variants="Base,Bi+MNTP,Bi+Contrastive",
        tasks="miracl",
        **{"retrieval.steps": 0, "task_paths.msmarco_pairs": "@generated/pairs", "sweep.enabled": False},
        **{f"paths.{v}": str(work / "variants" / v.replace("_", "-")) for v in ("bi_mntp", "bi_contrastive")},
    )
    with pytest.MonkeyPatch.context() as m:
        m.setattr(adapter, "run_mteb", _fake_run_mteb(seen))
        run_ablation(config, work, echo=None)
    return work, config, seen


def test_mteb_cells_are_instructed_as_they_were_trained(ablation, miracl):
    """Queries are instructed exactly when the model was trained contrastively with instructions, on an mteb task
    (MIRACL) as on a BEIR directory (docstrings); each cell records which instruction it used."""
    from bidirlm_jax.ablation import cells
    from bidirlm_jax.ablation.tasks import DOCSTRING_INSTRUCTION, TASKS
    from bidirlm_jax.pipeline.variants import Variant

    work, config, seen = miracl
    assert seen["base"][0][1] is None and seen["bi-mntp"][0][1] is None  # never trained with instructions
    assert isinstance(seen["bi-contrastive"][0][1], str) and seen["bi-contrastive"][0][1]
    recorded = {v: json.loads((work / f"cells/{v}/miracl.json").read_text())["settings"] for v in seen}
    assert [recorded[v]["instruction"] for v in ("base", "bi-mntp", "bi-contrastive")] == [None, None, cells.MTEB_TABLE]
    beir = json.loads((ablation[0] / "cells/base/docstrings.json").read_text())["settings"]
    assert beir["instruction"] == DOCSTRING_INSTRUCTION  # fine-tuned on the generated pairs, with instructions
    # MIRACL cells fine-tune on MS MARCO pairs without instructions: so they are evaluated, whatever the variant
    variant = Variant("Bi+Contrastive", work / "variants" / "bi-contrastive", "bidirectional", contrastive=True)
    assert cells.instruction(TASKS["miracl"], variant, cells.task_config(TASKS["miracl"], config), True) is None


def test_mteb_revisions_follow_the_weights(miracl, monkeypatch):
    """A recomputed MIRACL cell of a variant with other weights gets another mteb revision (mteb's cache never
    answers with the old score); with the same weights, the same revision (the cache is used)."""
    from bidirlm_jax.evals import mteb as adapter

    work, config, seen = miracl
    monkeypatch.setattr(adapter, "run_mteb", _fake_run_mteb(seen))
    weights = work / "variants" / "bi-mntp" / "model.safetensors"
    original = weights.read_bytes()
    for replacement in ((work / "variants" / "bi-contrastive" / "model.safetensors").read_bytes(), original):
        weights.write_bytes(replacement)
        (work / "cells" / "bi-mntp" / "miracl.json").unlink()
        run_ablation(config, work, echo=None)
    revisions = [revision for revision, _ in seen["bi-mntp"]]
    assert len(revisions) == 3 and revisions[1] != revisions[0] == revisions[2]


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
