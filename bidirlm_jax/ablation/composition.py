"""`run_composition(config, workdir)`: the paper's composition study (§6, Figures 6–8) for one encoder and one
specialist — what `bidirlm ablate --config configs/specialists.py:PRESET --workdir DIR` runs.

For each ratio (the weight on the specialist) it merges the Bi+MNTP encoder with the causal specialist (0 is
Bi+MNTP, 1 Bi+Specialist: the specialist read bidirectionally; `ablation.specialists`), fine-tunes each merge
on the task with a validation every `finetune.eval_every` steps, and writes:

    WORKDIR/results.jsonl        one row per variant: best and final score, its step, the learning curve
    WORKDIR/results.md           the table (×100) and the encoder–specialist layer-wise cosine similarity
    WORKDIR/learning_curves.png  score against steps of Bi+MNTP, Bi+Specialist and the merge (EMA α = 0.4)
    WORKDIR/merge_ratio.png      best score against the ratio
    WORKDIR/similarity.json      the cosine similarity, mean and per layer (`merge.similarity`)
    WORKDIR/cells/SLUG-KEY/      a variant's fine-tuning run; cells/SLUG-KEY.json its finished cell

A cell is keyed by its provenance, as the ablation harness keys them (`ablation.cells`): the digest of its
variant's files and its fine-tuning settings. A finished cell is read back, an interrupted one resumed; a
variant made from a changed encoder or specialist has other files, so its cells have other keys and are
computed anew (the old ones stay, reusable if the inputs come back). Every input is checked before anything
is written, a specialist whose backbone differs from the encoder's included (the tensor named).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from bidirlm_jax.ablation import curves, report
from bidirlm_jax.ablation.cells import claim_run
from bidirlm_jax.ablation.harness import GENERATE, check_checkpoint, check_study, compilation_cache
from bidirlm_jax.ablation.records import reuse, write_json
from bidirlm_jax.ablation.specialists import (
    build_encoder,
    build_merge,
    build_specialist,
    files,
    provenance_key,
    specialist_texts,
    variant_name,
    variant_slug,
)
from bidirlm_jax.ablation.sweep import check_ratios
from bidirlm_jax.ablation.tasks import Task, finetune_config, resolve_generated
from bidirlm_jax.configs.specialists import BUILD
from bidirlm_jax.errors import ConfigError, Preempted
from bidirlm_jax.io.atomic import write_atomically
from bidirlm_jax.pipeline.variants import relevant_settings

PEAK = 0.93  # the paper's "reaches > 93 % of its peak in 20 steps"


@dataclasses.dataclass
class CompositionResult:
    """What `run_composition` produced: one row per variant (in ratio order), the table's Markdown, the
    encoder–specialist similarity, the files written, and the cells ("variant") computed or read back."""

    rows: list[dict[str, Any]]
    markdown: str
    similarity: dict[str, Any]
    table_jsonl: Path
    table_markdown: Path
    curves_png: Path
    ratio_png: Path
    computed: list[str]
    reused: list[str]


@dataclasses.dataclass
class _Plan:
    config: ConfigDict
    workdir: Path
    ratios: list[float]
    task: Task
    finetune: ConfigDict  # the cells' fine-tuning config, `model.*` set per variant


def parse_settings(text: str, template: ConfigDict) -> dict[str, Any]:
    """`"data.path=X;finetune.label_field=y"` → `{dotted key: value}`, each value of the type `template`
    holds there; an unknown key or a value of the wrong type is refused by name."""
    out: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"task.settings item {item!r} is not KEY=VALUE")
        node = template
        for part in key.strip().split("."):
            if not isinstance(node, ConfigDict) or part not in node:
                raise ConfigError(f"task.settings names {key!r}, which configs/finetune.py does not have")
            node = node[part]
        try:
            if isinstance(node, bool):
                out[key.strip()] = {"true": True, "false": False}[value.strip().lower()]
            else:
                out[key.strip()] = type(node)(value.strip()) if isinstance(node, int | float) else value.strip()
        except (KeyError, ValueError):
            raise ConfigError(f"task.settings {key}={value!r}: the key takes a {type(node).__name__}") from None
    return out


def task_of(config: ConfigDict) -> tuple[Task, ConfigDict]:
    """The study's task and its fine-tuning config (`model.*` set per variant)."""
    from bidirlm_jax.configs import finetune
    from bidirlm_jax.evals.metrics import BEST_METRIC

    template = finetune.get_config(config.task.preset)
    settings = parse_settings(config.task.settings, template)
    kind = settings.get("objective", template.objective)
    metric = config.task.metric or BEST_METRIC.get(kind, "")
    if config.task.metric:
        settings["evals.validation.best_metric"] = metric
    task = Task(config.task.name or config.task.preset, kind, metric, preset=config.task.preset, settings=settings)
    cfg = finetune_config(task, config.finetune, ConfigDict())
    for name, (data, split) in parse_test_sets(config.task.get("test_sets", "")).items():
        cfg.evals[name] = copy.deepcopy(cfg.evals.validation)
        cfg.evals[name].update(data=data, split=split, best_metric="")
    return task, cfg


def parse_test_sets(text: str) -> dict[str, tuple[str, str]]:
    """`"safe=/data/safe.jsonl;aegis=hf:org/aegis@test"` → {name: (data, split)} (split `test` by default)."""
    out: dict[str, tuple[str, str]] = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        name, sep, where = (p.strip() for p in item.partition("="))
        data, _, split = where.rpartition("@") if "@" in where else (where, "", "test")
        if not sep or not name.isidentifier() or name == "validation" or name in out or not data or not split:
            raise ConfigError(
                f"task.test_sets item {item!r}: expected NAME=DATA[@SPLIT] with a new identifier NAME (not "
                "'validation') and a data path or hf: name"
            )
        out[name] = (data, split)
    return out


def check(config: ConfigDict, workdir: str | os.PathLike) -> _Plan:
    """Every input of `run_composition` checked; raises `ConfigError` (what, and how to fix it)."""
    from bidirlm_jax.configs.specialists import get_config
    from bidirlm_jax.train.config import validate

    workdir = check_study(config, get_config("tiny"), workdir, "specialists")
    ratios = check_ratios(config.ratios.split(","))
    if not 0.0 <= config.merge_ratio <= 1.0:
        raise ConfigError(f"merge_ratio={config.merge_ratio} must lie in [0, 1] (the weight on the specialist)")
    for key, what in (("encoder", "the Bi+MNTP encoder"), ("specialist", "the causal specialist")):
        if not config[key]:
            raise ConfigError(f"no {key}: set --config.{key}=HF_DIR ({what}), or 'build' to make one from the base")
        if config[key] != BUILD:
            check_checkpoint(Path(config[key]), key)
    if BUILD in (config.encoder, config.specialist) and config.base != GENERATE:
        if not config.base:
            raise ConfigError("building the encoder or specialist needs --config.base=HF_DIR, or 'generate'")
        check_checkpoint(Path(config.base), "base")
    task, cfg = task_of(config)
    validate(cfg)
    if config.encoder == BUILD:
        validate(config.mntp)
    if config.specialist == BUILD:
        specialist_texts(cfg, config.adapt)
    ratios = sorted({*ratios, float(config.merge_ratio), 0.0, 1.0})  # the table always holds both ends
    return _Plan(config, workdir, ratios, task, cfg)


def run_composition(
    config: ConfigDict, workdir: str | os.PathLike, *, echo: Callable[[str], None] | None = print
) -> CompositionResult:
    """Run (or resume) the composition study `config` describes (`configs/specialists.py`) in `workdir`."""
    from bidirlm_jax.merge.similarity import layer_cosine_similarity
    from bidirlm_jax.pipeline.timer import Timer

    plan = check(config, workdir)
    similarity = None
    if BUILD not in (config.encoder, config.specialist):  # a foreign backbone refused before anything is written
        similarity = layer_cosine_similarity(config.encoder, config.specialist)
    plan.workdir.mkdir(parents=True, exist_ok=True)
    timer = Timer(echo=echo or (lambda _: None))
    with compilation_cache(plan.workdir / "jax-cache" if config.compilation_cache else None):
        encoder, specialist = _inputs(plan, timer)
        if similarity is None:
            similarity = layer_cosine_similarity(encoder, specialist)
        timer.record("cosine similarity", 0.0, f"{similarity['mean']:.4f} (layer-wise mean)")
        rows, computed, reused = [], [], []
        for ratio in plan.ratios:
            path, provenance = build_merge(encoder, specialist, ratio, plan.workdir, timer)
            row, fresh = _cell(plan, ratio, path, provenance, timer)
            rows.append(row)
            (computed if fresh else reused).append(row["variant"])
    return _report(plan, rows, similarity, {"encoder": str(encoder), "specialist": str(specialist)}, computed, reused)


def _inputs(plan: _Plan, timer) -> tuple[Path, Path]:
    """The encoder and the specialist: as given, or built here (from the base, generated or given)."""
    from bidirlm_jax.ablation.harness import generate_data

    config, work = plan.config, plan.workdir
    if BUILD not in (config.encoder, config.specialist):
        return Path(config.encoder).resolve(), Path(config.specialist).resolve()
    generated = generate_data(work, config.generate, config.base == GENERATE, timer)
    base = generated / "base" if config.base == GENERATE else Path(config.base).resolve()
    if config.encoder == BUILD:
        encoder = build_encoder(base, resolve_generated(copy.deepcopy(config.mntp), generated), work, timer)
    else:
        encoder = Path(config.encoder).resolve()
    if config.specialist == BUILD:
        texts = specialist_texts(plan.finetune, config.adapt)
        specialist = build_specialist(base, texts, config.adapt, config.generate.seq_len, work, timer)
    else:
        specialist = Path(config.specialist).resolve()
    return encoder, specialist


def _cell(plan: _Plan, ratio: float, path: Path, provenance: dict[str, Any], timer) -> tuple[dict[str, Any], bool]:
    """(the variant's row, whether it was computed now): its fine-tuning run, keyed by provenance."""
    from bidirlm_jax.evals.registry import EVALUATORS
    from bidirlm_jax.io.heads import read_best
    from bidirlm_jax.train import train

    name, task, work = variant_name(ratio), plan.task, plan.workdir
    cfg = copy.deepcopy(plan.finetune)
    cfg.model.update(init_from=str(path), attention="bidirectional")
    recorded = relevant_settings(json.loads(cfg.to_json_best_effort()))
    recorded["model"]["init_from"] = "the variant"  # its files are the provenance; its path is named by them
    settings = {"variant": {"name": name, "ratio": ratio, "files": files(path, work)}, "config": recorded}
    run = work / "cells" / f"{variant_slug(ratio)}-{provenance_key(settings)}"
    record_path = run.parent / f"{run.name}.json"
    if (record := reuse(record_path, settings, f"the {name} cell")) is not None:
        timer.record(f"cell: {name}", 0.0, "reused")
        return record["row"], False
    start = time.perf_counter()
    claim_run(run, settings, f"the {name} cell")
    result = train(cfg, str(run), evaluators=EVALUATORS)
    if result["preempted"]:
        raise Preempted(run, result["step"])
    best = read_best(run)
    curve = curves.read_curve(run, task.metric)
    if best is None or not curve:
        raise ConfigError(f"{run} recorded no validation score; remove it and run again")
    peak = float(best["metrics"][task.metric])
    at_best = {  # each test set's score at the validation's best step
        name: dict(curves.read_curve(run, f"{name}/{task.metric}")).get(int(best["step"]))
        for name in parse_test_sets(plan.config.task.get("test_sets", ""))
    }
    row = {
        "variant": name,
        "ratio": ratio,
        "task": task.name,
        "metric": task.metric,
        "score": peak,
        "step": int(best["step"]),
        "final": curve[-1][1],
        "steps": cfg.train.steps,
        "reaches_peak_share_at": next((s for s, v in curve if v >= PEAK * peak), None),
        "metrics": {k: float(v) for k, v in best["metrics"].items()},
        "test_scores": at_best,
        "curve": [[s, v] for s, v in curve],
        "provenance": provenance,
    }
    write_json(record_path, {"settings": settings, "row": row})
    timer.record(f"cell: {name}", time.perf_counter() - start, f"{task.metric} {100 * peak:.1f}")
    return row, True


def markdown_table(rows: list[dict[str, Any]], similarity: dict[str, Any], default: float) -> str:
    """One line per variant (×100): best score and its step, final score, the first step at 93 % of its best;
    then the encoder–specialist similarity."""
    metric = rows[0]["metric"]
    tests = list(rows[0].get("test_scores", {}))
    lines = [
        f"| variant | weight on specialist | best {metric} | at step | final | {round(100 * PEAK)} % of best at step |"
        + "".join(f" {name} at best |" for name in tests),
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(tests),
    ]
    for row in rows:
        mark = " (default)" if row["ratio"] == default and row["ratio"] not in (0, 1) else ""
        scores = [row["test_scores"].get(name) for name in tests]
        lines.append(
            f"| {row['variant']}{mark} | {row['ratio']:g} | {100 * row['score']:.1f} | {row['step']} | "
            f"{100 * row['final']:.1f} | {row['reaches_peak_share_at']} |"
            + "".join(" – |" if v is None else f" {100 * v:.1f} |" for v in scores)
        )
    layers = ", ".join(f"{c:.4f}" for c in similarity["layers"])
    lines += ["", f"Layer-wise cosine similarity, encoder vs specialist: {similarity['mean']:.4f} (layers: {layers})"]
    return "\n".join(lines)


def _report(plan: _Plan, rows, similarity, inputs, computed, reused) -> CompositionResult:
    work, task, default = plan.workdir, plan.task, float(plan.config.merge_ratio)
    write_atomically(work / "results.jsonl", "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
    markdown = markdown_table(rows, similarity, default)
    write_atomically(work / "results.md", markdown + "\n")
    write_json(work / "similarity.json", {**inputs, **similarity})
    shown = {row["variant"]: row["curve"] for row in rows if row["ratio"] in (0.0, 1.0, default)}
    label = task.metric.replace("_", " ")
    curves_png = curves.plot_curves(
        shown, work / "learning_curves.png", f"{task.name}: fine-tuning each variant", label
    )
    ratio_png = report.plot_sweep(
        [{"ratio": row["ratio"], task.metric: row["score"]} for row in rows],
        work / "merge_ratio.png",
        f"Merge(Bi+MNTP, specialist) on {task.name}: best validation {label}",
        task.metric,
        xlabel="merging ratio: weight on the specialist (%)",
    )
    return CompositionResult(
        rows,
        markdown,
        similarity,
        work / "results.jsonl",
        work / "results.md",
        curves_png,
        ratio_png,
        computed,
        reused,
    )
