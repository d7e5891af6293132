"""`run_ablation(config, workdir)`: the paper's variant × task study (Figure 2) and merge-ratio sweep (Figure 4)
for one base model — what `bidirlm ablate --config configs/ablation.py:PRESET --workdir DIR` runs.

    WORKDIR/generated/        the generated data (and base) when the config asks for them (`@generated/...`)
    WORKDIR/variants/         the variants built here (`bidirlm_jax.variants`: HF directories, runs, manifest)
    WORKDIR/cells/V/TASK/     the fine-tuning run of variant V on TASK (checkpoints, best/, metrics.jsonl)
    WORKDIR/cells/V/TASK.json the finished cell: its score, every validation metric, the settings it ran with
    WORKDIR/results.jsonl     one row per cell;  results.md: the table (×100, Δ vs Base);  deltas.png
    WORKDIR/merge_ratio.json  the sweep's points and settings;  merge_ratio.png

Every input is checked before anything is written (unknown keys, tasks or variants, variant paths that are
not checkpoints, missing task files, an output under a file). Every output is written whole or not at all:
directories through `io.atomic.atomic_directory`, files by renaming a finished temporary. So a run resumes:
a finished cell (its `.json` exists) is read back, not recomputed — unless it was computed with other
settings, which is refused by name rather than mixed into the table; an interrupted fine-tuning run resumes
from its last checkpoint; finished variants and the generated data are reused the same way.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from bidirlm_jax.ablation import report
from bidirlm_jax.ablation.sweep import check_ratios, merge_ratio_sweep, mntp_scorer
from bidirlm_jax.ablation.tasks import GENERATED, Task, finetune_config, resolve_tasks, retrieval_config
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.variants import (
    BASE,
    BI_CONTRASTIVE,
    BI_MNTP_CONTRASTIVE,
    DIRECTORIES,
    VARIANTS,
    Recipe,
    Variant,
    relative_path,
    relevant_settings,
    settings_difference,
)

PATH_KEYS = {name: directory.replace("-", "_") for name, directory in DIRECTORIES.items()}  # Bi+MNTP -> bi_mntp
SLUGS = {BASE: "base", **DIRECTORIES}
GENERATE = "generate"  # config.base: pre-train a small base on the standard library (as `bidirlm demo` does)


@dataclasses.dataclass
class AblationResult:
    """What `run_ablation` produced: the table's rows (one per cell, in variant × task order), its Markdown,
    the sweep's points and the files written. `computed` / `reused` list the cells ("variant / task") this call
    trained or read back."""

    rows: list[dict[str, Any]]
    markdown: str
    sweep: list[dict[str, float]]
    table_jsonl: Path
    table_markdown: Path
    deltas_png: Path
    sweep_json: Path | None
    sweep_png: Path | None
    computed: list[str]
    reused: list[str]


@dataclasses.dataclass
class _Plan:
    config: ConfigDict
    workdir: Path
    variants: list[str]
    tasks: list[Task]
    given: dict[str, Path]  # variants taken from config.paths
    generate_data: bool
    ratios: list[float]


# --- checks (before anything is written) ------------------------------------------------------------


def _unknown_keys(config: ConfigDict, template: ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for key, value in config.items():
        if key not in template:
            out.append(prefix + key)
        elif isinstance(value, ConfigDict) and isinstance(template[key], ConfigDict):
            out += _unknown_keys(value, template[key], f"{prefix}{key}.")
    return out


def _check_output(workdir: Path) -> None:
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} is a file; give a directory (new, or a previous ablation's)")
    ancestor = workdir.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"--workdir {workdir} lies under {ancestor}, which is a file; choose another directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir {workdir}: {ancestor} is not writable; choose another directory")


def _check_checkpoint(path: Path, what: str) -> Path:
    path = path.expanduser().resolve()
    weights = list(path.glob("*.safetensors")) if path.is_dir() else []
    if not (path / "config.json").is_file() or not weights or not (path / "tokenizer.json").is_file():
        raise ConfigError(
            f"{what}={path} is not a checkpoint: give a Hugging Face model directory with config.json, "
            "*.safetensors and tokenizer.json (`bidirlm export` turns a training run into one)"
        )
    return path


def _uses_generated(config: ConfigDict) -> bool:
    return any(isinstance(v, str) and v.startswith(GENERATED) for v in _strings(config))


def _strings(config: ConfigDict):
    for value in config.values():
        if isinstance(value, ConfigDict):
            yield from _strings(value)
        else:
            yield value


def check(config: ConfigDict, workdir: str | os.PathLike) -> _Plan:
    """Every input of `run_ablation` checked; raises `ConfigError` (one line: what and how to fix it)."""
    from bidirlm_jax.configs.ablation import get_config
    from bidirlm_jax.train.config import validate

    if not isinstance(config, ConfigDict):
        raise ConfigError(f"the ablation config must be an ml_collections ConfigDict, got {type(config).__name__}")
    if unknown := _unknown_keys(config, get_config("tiny")):
        raise ConfigError(f"unknown config key(s) {unknown}; see bidirlm_jax/configs/ablation.py for the valid ones")
    workdir = Path(workdir).expanduser().absolute()
    _check_output(workdir)
    names = [n.strip() for n in config.variants.split(",") if n.strip()]
    if bad := [n for n in names if n not in VARIANTS]:
        raise ConfigError(f"unknown variant(s) {bad} in config.variants; choose among {', '.join(VARIANTS)}")
    if BASE not in names:
        raise ConfigError("config.variants must include Base: every delta of the table is against it")
    tasks = resolve_tasks(config.tasks)
    given = {n: _check_checkpoint(Path(config.paths[k]), f"paths.{k}") for n, k in PATH_KEYS.items() if config.paths[k]}
    if config.base != GENERATE:
        if not config.base:
            raise ConfigError(
                "no base model: set --config.base=HF_DIR (the causal base with its tokenizer), or 'generate' for "
                "a small one pre-trained here on the standard library"
            )
        _check_checkpoint(Path(config.base), "base")
    recipe = Recipe(
        mntp=config.mntp,
        contrastive=config.contrastive,
        merge_ratio=config.merge_ratio,
        contrastive_from=config.contrastive_from,
    )
    validate(recipe.mntp)
    validate(recipe.contrastive)
    for task in tasks:  # builds (and so checks) every cell's config, local files included
        validate(_task_config(task, config))
    ratios = check_ratios(config.sweep.ratios.split(",")) if config.sweep.enabled else []
    if config.sweep.enabled and config.sweep.adapted not in VARIANTS:
        raise ConfigError(f"sweep.adapted={config.sweep.adapted!r} is not one of {', '.join(VARIANTS)}")
    if config.sweep.texts and not Path(config.sweep.texts).exists():
        raise ConfigError(f"sweep.texts={config.sweep.texts} does not exist; give a .txt or .jsonl file of text")
    generate_data = config.base == GENERATE or _uses_generated(config)
    return _Plan(config, workdir, names, tasks, given, generate_data, ratios)


def parse_args(argv: list[str]) -> tuple[ConfigDict, str]:
    """`--config FILE.py[:PRESET] --workdir DIR [--config.key=value ...]` (as `bidirlm train` parses them) ->
    (config, workdir); an unknown override key is refused by name."""
    from bidirlm_jax.train.config import parse_config_args

    return parse_config_args(argv, command="ablate", workdir="where the variants, cells, table and plots go")


def _task_config(task: Task, config: ConfigDict) -> ConfigDict:
    if task.kind == "retrieval":
        return retrieval_config(task, config.contrastive, config.retrieval, config.task_paths)
    return finetune_config(task, config.finetune, config.task_paths)


# --- the run -----------------------------------------------------------------------------------------


def run_ablation(
    config: ConfigDict, workdir: str | os.PathLike, *, echo: Callable[[str], None] | None = print
) -> AblationResult:
    """Run (or resume) the ablation `config` describes (`configs/ablation.py`) in `workdir`.

    For the base model: build or take the variants, fine-tune each on each task (a cell), write the table
    (`results.jsonl`, `results.md`), the plot of deltas vs Base (`deltas.png`) and, unless `sweep.enabled` is
    off, the merge-ratio sweep (`merge_ratio.json`, `merge_ratio.png`). Finished cells, variants and sweep are
    reused by a second call. `echo` prints one line per phase (None: silent). Raises `ConfigError` before
    writing anything when an input is unusable.
    """
    from bidirlm_jax.demo import Timer

    plan = check(config, workdir)
    plan.workdir.mkdir(parents=True, exist_ok=True)
    cache = plan.workdir / "jax-cache" if config.compilation_cache else None
    with _compilation_cache(cache):
        return _run(plan, Timer(echo=echo or (lambda _: None)))


@contextlib.contextmanager
def _compilation_cache(directory: Path | None):
    """JAX's persistent compilation cache in `directory` while the ablation runs (every cell of one variant
    shape compiles the same steps: the first compiles, the others read), unless one is configured already."""
    import jax

    if directory is None or jax.config.jax_compilation_cache_dir:
        yield
        return
    settings = {
        "jax_compilation_cache_dir": str(directory),
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    before = {key: getattr(jax.config, key) for key in settings}
    for key, value in settings.items():
        jax.config.update(key, value)
    try:
        yield
    finally:
        for key, value in before.items():
            jax.config.update(key, value)


def _run(plan: _Plan, timer) -> AblationResult:
    work = plan.workdir
    generated = _generate(plan, timer) if plan.generate_data else None
    config = _resolve(copy.deepcopy(plan.config), work / "generated")
    base = generated / "base" if config.base == GENERATE else _check_checkpoint(Path(config.base), "base")
    variants = _variants(plan, config, base, timer)
    rows, computed, reused = [], [], []
    for name in plan.variants:
        for task in plan.tasks:
            row, fresh = _cell(variants[name], task, config, work, timer)
            rows.append(row)
            (computed if fresh else reused).append(f"{name} / {task.name}")
    title = f"Variants vs Base, fine-tuned on each task (base: {relative_path(base, work)})"
    markdown = report.write_table(rows, work / "results.jsonl", work / "results.md")
    deltas = report.plot_table(rows, work / "deltas.png", title)
    points, sweep_json, sweep_png = [], None, None
    if plan.ratios:
        points, sweep_json = _sweep(plan, config, variants, generated, timer)
        adapted = config.sweep.adapted
        sweep_png = report.plot_sweep(
            points,
            work / "merge_ratio.png",
            f"{adapted} ⊕ Base: MNTP masked accuracy on held-out text",
            "masked_accuracy",
        )
    return AblationResult(
        rows,
        markdown,
        points,
        work / "results.jsonl",
        work / "results.md",
        deltas,
        sweep_json,
        sweep_png,
        computed,
        reused,
    )


def _write_json(path: Path, record: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is unreadable ({e}); remove it to recompute it") from None


def _reuse(path: Path, settings: dict[str, Any], what: str) -> Any | None:
    """The record at `path` when it exists and was made with `settings`; None when it does not exist."""
    if not path.is_file():
        return None
    record = _read_json(path)
    if difference := settings_difference(record.get("settings") or {}, settings):
        raise ConfigError(
            f"{path} holds {what} made with other settings ({difference}); "
            "remove it to recompute it, or choose another --workdir"
        )
    return record


def _generate(plan: _Plan, timer) -> Path:
    """`WORKDIR/generated/`: the demo's corpus (data/) and, for `base="generate"`, its pre-trained base (base/)."""
    from bidirlm_jax import demo
    from bidirlm_jax.io.atomic import atomic_directory

    out = plan.workdir / "generated"
    settings = {"generate": plan.config.generate.to_dict(), "base": plan.config.base == GENERATE}
    if _reuse(out / "settings.json", settings, "generated data") is not None:
        return out
    size = demo.Size(**plan.config.generate.to_dict())
    with atomic_directory(out) as tmp, timer.phase("generated data and base") as note:
        corpus = demo.build_corpus(num_negatives=size.num_negatives, max_eval_queries=size.max_eval_queries)
        demo.write_data(corpus, tmp / "data")
        if settings["base"]:
            demo.pretrain_base(tmp, corpus.train_texts, size=size, timer=timer)
        _write_json(tmp / "settings.json", {"settings": settings})
        note["text"] = (
            f"{len(corpus.train_texts)} training docstrings, {len(corpus.eval_data.queries)} held-out queries"
        )
    return out


def _at(value: Any, generated: Path) -> Any:
    """`@generated/X` -> `generated/data/X`; any other value as it is."""
    if isinstance(value, str) and value.startswith(GENERATED):
        return str(generated / "data" / value[len(GENERATED) :].lstrip("/"))
    return value


def _resolve(config: ConfigDict, generated: Path) -> ConfigDict:
    """`_at` on every string of `config`."""
    for key, value in config.items():
        if isinstance(value, ConfigDict):
            _resolve(value, generated)
        else:
            config[key] = _at(value, generated)
    return config


def _variants(plan: _Plan, config: ConfigDict, base: Path, timer) -> dict[str, Variant]:
    from bidirlm_jax.variants import build_variants

    wanted = set(plan.variants) | ({config.sweep.adapted} if plan.ratios else set())
    out = {n: _given(n, p) for n, p in plan.given.items() if n in wanted}
    build = [n for n in VARIANTS if n in wanted and n not in out]
    recipe = Recipe(
        mntp=config.mntp,
        contrastive=config.contrastive,
        merge_ratio=config.merge_ratio,
        contrastive_from=config.contrastive_from,
    )

    def phase(name: str, variant: Variant, seconds: float) -> None:
        timer.record(f"variant: {name}", seconds, "reused" if not seconds else str(variant.path))

    out.update(build_variants(base, plan.workdir / "variants", recipe, names=build, on_phase=phase))
    return out


def _given(name: str, path: Path) -> Variant:
    attention = "causal" if name == BASE else "bidirectional"
    return Variant(name, path, attention, contrastive=name in (BI_CONTRASTIVE, BI_MNTP_CONTRASTIVE))


def _settings(config: ConfigDict, variant: Variant, work: Path) -> dict[str, Any]:
    record = relevant_settings(json.loads(config.to_json_best_effort()))
    record["model"]["init_from"] = relative_path(variant.path, work)
    return record


def _cell(variant: Variant, task: Task, config: ConfigDict, work: Path, timer) -> tuple[dict[str, Any], bool]:
    """(the cell's row, whether it was computed now)."""
    from bidirlm_jax.train import train

    run = work / "cells" / SLUGS[variant.name] / task.name
    path = run.with_suffix(".json")
    cfg = _resolve(_task_config(task, config), work / "generated")
    cfg.model.update(init_from=str(variant.path), attention=variant.attention)
    if task.kind == "retrieval":
        cfg.contrastive.pooling = "mean" if variant.attention == "bidirectional" else "last"  # paper §7.1
    settings = {"variant": variant.name, "config": _settings(cfg, variant, work)}
    if (record := _reuse(path, settings, f"the {variant.name} / {task.name} cell")) is not None:
        timer.record(f"cell: {variant.name} / {task.name}", 0.0, "reused")
        return record["row"], False
    start = time.perf_counter()
    trained = task.kind != "retrieval" or config.retrieval.steps > 0
    if trained:
        run.parent.mkdir(parents=True, exist_ok=True)
        train(cfg, str(run))
    if task.kind == "retrieval":
        metrics = _retrieval_metrics(variant, task, cfg, run if trained else None, config.retrieval.max_length, work)
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
    _write_json(path, {"settings": settings, "row": row})
    timer.record(
        f"cell: {variant.name} / {task.name}", time.perf_counter() - start, f"{task.metric} {100 * row['score']:.1f}"
    )
    return row, True


def _retrieval_metrics(
    variant: Variant, task: Task, cfg: ConfigDict, run: Path | None, max_length: int, work: Path
) -> dict[str, float]:
    """The retrieval scores of the fine-tuned model (`run`), or of the variant as it is (`run` None)."""
    from bidirlm_jax.data.tokenizer import load_tokenizer
    from bidirlm_jax.io.hf import from_pretrained

    if run is not None:
        model = from_pretrained(run, attention=variant.attention)
        tokenizer = load_tokenizer(run / "model")
        instructed = bool(cfg.contrastive.instructions)
    else:
        model, tokenizer, instructed = variant.load(), variant.tokenizer(), variant.contrastive
    pooling = cfg.contrastive.pooling
    instruction = task.instruction if instructed and task.instruction else None
    if task.evaluation.startswith("mteb:"):
        from bidirlm_jax.evals.mteb import MTEBEncoder, run_mteb

        name = task.evaluation[len("mteb:") :]
        revision = f"{SLUGS[variant.name]}-{task.name}-{cfg.train.steps}"
        encoder = MTEBEncoder(
            model,
            tokenizer,
            name=f"bidirlm-ablation/{SLUGS[variant.name]}",
            revision=revision,
            pooling=pooling,
            max_length=max_length,
        )
        return {task.metric: run_mteb(encoder, [name], cache_dir=work / "mteb")[name]["main_score"]}
    from bidirlm_jax.evals.retrieval import evaluate_retrieval

    data = _at(task.evaluation, work / "generated")
    return evaluate_retrieval(
        model,
        tokenizer,
        data,
        instruction=instruction,
        pooling=pooling,
        max_length=max_length,
        batch_size=64,
        progress=False,
    )


# --- the merge-ratio sweep ---------------------------------------------------------------------------


def _sweep_texts(plan: _Plan, config: ConfigDict, generated: Path | None) -> list[str]:
    """The held-out text the sweep scores: `sweep.texts`, else the generated held-out docstrings, else the
    validation texts of the first sequence or token task."""
    limit = config.sweep.max_texts
    if config.sweep.texts:
        from bidirlm_jax.data.sources import iter_documents

        texts = []
        for text in iter_documents(config.sweep.texts):
            texts.append(text)
            if len(texts) == limit:
                break
        return texts
    if generated is not None:
        from bidirlm_jax.evals.retrieval import load_beir

        return [text for _, text in list(load_beir(generated / "data" / "heldout-beir").corpus.values())[:limit]]
    task = next((t for t in plan.tasks if t.kind != "retrieval"), None)
    if task is None:
        raise ConfigError("the merge-ratio sweep needs held-out text: set --config.sweep.texts=FILE (.txt or .jsonl)")
    from bidirlm_jax.data.labeled import synthetic_texts
    from bidirlm_jax.train.objectives.finetune import load_splits

    return synthetic_texts(load_splits(_task_config(task, config), task.kind)[1])[:limit]


def _sweep(plan: _Plan, config: ConfigDict, variants: dict[str, Variant], generated: Path | None, timer):
    adapted, base = variants[config.sweep.adapted], variants[BASE]
    path = plan.workdir / "merge_ratio.json"
    settings = {
        "adapted": relative_path(adapted.path, plan.workdir),
        "base": relative_path(base.path, plan.workdir),
        "ratios": plan.ratios,
        "texts": config.sweep.texts,
        "max_texts": config.sweep.max_texts,
        "score": "mntp masked accuracy",
    }
    if (record := _reuse(path, settings, "a merge-ratio sweep")) is not None:
        timer.record("merge-ratio sweep", 0.0, "reused")
        return record["points"], path
    texts = _sweep_texts(plan, config, generated)
    score = mntp_scorer(texts, adapted.tokenizer(), max_length=min(config.mntp.data.seq_len, 512))
    with timer.phase("merge-ratio sweep") as note:
        points = merge_ratio_sweep(adapted.path, base.path, score, ratios=plan.ratios)
        note["text"] = ", ".join(f"{p['ratio']:g}: {100 * p['masked_accuracy']:.1f}" for p in points)
    _write_json(path, {"settings": settings, "points": points})
    return points, path
