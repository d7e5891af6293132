"""One cell of the ablation table: a variant fine-tuned on a task and scored (`run_cell`).

    WORKDIR/cells/V/TASK/            the fine-tuning run (checkpoints, best/, metrics.jsonl) and cell.json:
                                     the settings it was started with
    WORKDIR/cells/V/TASK.json        the finished cell: its row and its settings

A cell's settings are its training config, its variant's provenance — the digest of the variant directory's
files (`io.digest`: a variant rebuilt, retrained or replaced in place has another one, a copy the same) — and,
for retrieval, the instructions its queries were evaluated with. A finished cell is reused only with equal
settings. So is an interrupted run resumed: it continues a model fine-tuned from what the variant was when the
run started. Either, made with other settings, is refused by name rather than deleted (the user decides whether
the old scores go): after rebuilding a variant, remove `WORKDIR/cells/V/` to recompute its cells.

Instructions, one protocol for every retrieval column: queries are instructed at evaluation exactly when the
evaluated model was trained contrastively with instructions — by the cell's fine-tuning (its
`contrastive.instructions`; MS MARCO pairs for MIRACL carry none), or with `retrieval.steps = 0` by the variant's
own training (`Variant.contrastive`) — with the task's instruction on a BEIR directory and BidirLM's table
(`evals.mteb`) on an mteb task; otherwise with none at all (not mteb's per-task defaults either).

A run stopped by SIGTERM raises `errors.Preempted`: nothing is recorded and its checkpoint is kept, so the same
command resumes it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from bidirlm_jax.ablation.records import read_json, reuse, write_json
from bidirlm_jax.ablation.tasks import Task, finetune_config, generated_path, resolve_generated, retrieval_config
from bidirlm_jax.errors import ConfigError, Preempted
from bidirlm_jax.pipeline.variants import (
    BASE,
    DIRECTORIES,
    Variant,
    relative_path,
    relevant_settings,
    settings_difference,
)

SLUGS = {BASE: "base", **DIRECTORIES}
DIGESTS = "digests.json"  # WORKDIR/: the files' digests `io.digest` remembers between runs
RUN_RECORD = "cell.json"  # in the cell's run directory
MTEB_TABLE = "BidirLM's table (mteb bidirlm_models.bidirlm_task_prompts)"


def task_config(task: Task, config: ConfigDict) -> ConfigDict:
    """The training config of `task`'s cells (`model.*` is set per variant by `run_cell`)."""
    if task.kind == "retrieval":
        return retrieval_config(task, config.contrastive, config.retrieval, config.task_paths)
    return finetune_config(task, config.finetune, config.task_paths)


def variant_files(variant: Variant, work: Path) -> str:
    """The variant's provenance: the digest of its directory's files (remembered in WORKDIR/digests.json)."""
    from bidirlm_jax.io.digest import directory_digest

    return directory_digest(variant.path, cache=work / DIGESTS)


def instruction(task: Task, variant: Variant, cfg: ConfigDict, trained: bool) -> str | None:
    """What a retrieval cell's queries are instructed with at evaluation (see the module doc): the task's
    instruction, `MTEB_TABLE`, or None."""
    if trained:  # the stdlib pairs carry their own instructions
        instructed = cfg.data.source == "stdlib" or bool(cfg.contrastive.instructions)
    else:
        instructed = variant.contrastive
    if not instructed:
        return None
    return MTEB_TABLE if task.evaluation.startswith("mteb:") else task.instruction or None


def run_cell(variant: Variant, task: Task, config: ConfigDict, work: Path, timer) -> tuple[dict[str, Any], bool]:
    """(the cell's row, whether it was computed now); `ConfigError` for a cell or run made with other settings,
    `Preempted` when its fine-tuning stopped on SIGTERM."""
    from bidirlm_jax.evals.registry import EVALUATORS
    from bidirlm_jax.train import train

    run = work / "cells" / SLUGS[variant.name] / task.name
    path = run.with_suffix(".json")
    cfg = resolve_generated(task_config(task, config), work / "generated")
    cfg.model.update(init_from=str(variant.path), attention=variant.attention)
    if task.kind == "retrieval":
        cfg.contrastive.pooling = "mean" if variant.attention == "bidirectional" else "last"  # paper §7.1
    trained = task.kind != "retrieval" or config.retrieval.steps > 0
    settings = {
        "variant": {"name": variant.name, "files": variant_files(variant, work)},
        "config": _config_settings(cfg, variant, work),
    }
    if task.kind == "retrieval":
        settings["instruction"] = instruction(task, variant, cfg, trained)
    what = f"the {variant.name} / {task.name} cell"
    stale = f"remove it (or {run.parent}, every cell of {variant.name}, after rebuilding it) to recompute it"
    if (record := reuse(path, settings, what, remedy=stale)) is not None:
        timer.record(f"cell: {variant.name} / {task.name}", 0.0, "reused")
        return record["row"], False
    start = time.perf_counter()
    if trained:
        claim_run(run, settings, what)
        result = train(cfg, str(run), evaluators=EVALUATORS)
        if result["preempted"]:
            raise Preempted(run, result["step"])
    if task.kind == "retrieval":
        metrics = _retrieval_metrics(
            variant, task, cfg, run if trained else None, settings["instruction"], config, work
        )
        step = cfg.train.steps if trained else 0
    else:
        from bidirlm_jax.io.heads import read_best

        best = read_best(run)
        if best is None:
            raise ConfigError(f"{run} recorded no validation score; remove it and run again")
        metrics, step = best["metrics"], best["step"]
    row = {
        "variant": variant.name,
        "attention": variant.attention,
        "task": task.name,
        "kind": task.kind,
        "metric": task.metric,
        "score": float(metrics[task.metric]),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "step": int(step),
    }
    path.parent.mkdir(parents=True, exist_ok=True)  # no run made it when the cell trains nothing
    write_json(path, {"settings": settings, "row": row})
    timer.record(
        f"cell: {variant.name} / {task.name}", time.perf_counter() - start, f"{task.metric} {100 * row['score']:.1f}"
    )
    return row, True


def _config_settings(cfg: ConfigDict, variant: Variant, work: Path) -> dict[str, Any]:
    record = relevant_settings(json.loads(cfg.to_json_best_effort()))
    record["model"]["init_from"] = relative_path(variant.path, work)
    return record


def claim_run(run: Path, settings: dict[str, Any], what: str) -> None:
    """Start (or resume) the cell's run: record its settings in it, and refuse to resume one started with
    others — its checkpoints are a model fine-tuned from another variant, or in another way."""
    from bidirlm_jax.io.run import checkpoints_dir
    from bidirlm_jax.train.checkpoints import latest_step

    record = run / RUN_RECORD
    if record.is_file():
        recorded = read_json(record).get("settings") or {}
        if difference := settings_difference(recorded, settings):
            raise ConfigError(
                f"{run} holds an interrupted run of {what} started with other settings ({difference}); it cannot "
                "be resumed: remove it to restart the cell, or choose another --workdir"
            )
        return
    if latest_step(checkpoints_dir(run)) is not None:
        raise ConfigError(
            f"{run} holds a run of {what} that does not record what it was started from ({RUN_RECORD}); remove it "
            "to restart the cell"
        )
    run.mkdir(parents=True, exist_ok=True)
    write_json(record, {"settings": settings})


def _retrieval_metrics(
    variant: Variant,
    task: Task,
    cfg: ConfigDict,
    run: Path | None,
    query_instruction: str | None,
    config: ConfigDict,
    work: Path,
) -> dict[str, float]:
    """The retrieval scores of the fine-tuned model (`run`), or of the variant as it is (`run` None), its queries
    instructed as `instruction` chose (`query_instruction`)."""
    from bidirlm_jax.io.hf import from_pretrained
    from bidirlm_jax.io.run import model_dir
    from bidirlm_jax.io.tokenizer import load_tokenizer

    if run is not None:
        model, tokenizer, source = (
            from_pretrained(run, attention=variant.attention),
            load_tokenizer(model_dir(run)),
            run,
        )
    else:
        model, tokenizer, source = variant.load(), variant.tokenizer(), variant.path
    pooling, max_length = cfg.contrastive.pooling, config.retrieval.max_length
    if task.evaluation.startswith("mteb:"):
        from bidirlm_jax.evals.mteb import MTEBEncoder, run_mteb

        name = task.evaluation[len("mteb:") :]
        encoder = MTEBEncoder.from_loaded(  # revision: a hash of the model's files, so no stale cached score
            source,
            model,
            tokenizer,
            name=f"bidirlm-ablation/{SLUGS[variant.name]}",
            pooling=pooling,
            max_length=max_length,
            instructions=None if query_instruction else {},
        )
        return {task.metric: run_mteb(encoder, [name], cache_dir=work / "mteb")[name]["main_score"]}
    from bidirlm_jax.evals.retrieval import evaluate_retrieval

    return evaluate_retrieval(
        model,
        tokenizer,
        generated_path(task.evaluation, work / "generated"),
        instruction=query_instruction,
        pooling=pooling,
        max_length=max_length,
        batch_size=64,
        progress=False,
    )
