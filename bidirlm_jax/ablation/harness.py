"""`run_ablation(config, workdir)`: the paper's variant × task study (Figure 2) and merge-ratio sweep (Figure 4)
for one base model — what `bidirlm ablate --config configs/ablation.py:PRESET --workdir DIR` runs.

    WORKDIR/generated/        the generated data (and base) when the config asks for them (`@generated/...`)
    WORKDIR/variants/         the variants built here (`bidirlm_jax.pipeline.variants`: HF directories, runs, manifest)
    WORKDIR/cells/V/TASK/     the fine-tuning run of variant V on TASK (checkpoints, best/, metrics.jsonl, cell.json)
    WORKDIR/cells/V/TASK.json the finished cell: its score, every validation metric, the settings it ran with
    WORKDIR/results.jsonl     one row per cell;  results.md: the table (×100, Δ vs Base);  deltas.png
    WORKDIR/merge_ratio.json  the sweep's points and settings;  merge_ratio.png
    WORKDIR/digests.json      the digests of the variants' files, remembered (`io.digest`)

Every input is checked before anything is written (unknown keys, tasks or variants, variant paths that are
not checkpoints, missing task files, an output under a file). Every output is written whole or not at all:
directories through `io.atomic.atomic_directory`, files by renaming a finished temporary. So a run resumes:
a finished cell (its `.json` exists) is read back, not recomputed — unless it was computed with other
settings or from other files of its variant (rebuilt since), which is refused by name rather than mixed into
the table (`ablation.cells`); an interrupted fine-tuning run resumes from its last checkpoint, under the same
condition; finished variants, the generated data and the sweep are reused the same way. A SIGTERM during a
training run (a preemption) saves its checkpoint, records nothing and ends the ablation with
`errors.Preempted` (`bidirlm ablate` exits 0, as `bidirlm train` does), so the same command resumes it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from bidirlm_jax.ablation import report
from bidirlm_jax.ablation.cells import run_cell, task_config, variant_files
from bidirlm_jax.ablation.records import reuse, write_json
from bidirlm_jax.ablation.sweep import check_ratios, merge_ratio_sweep, mntp_scorer
from bidirlm_jax.ablation.tasks import GENERATED, Task, resolve_generated, resolve_tasks
from bidirlm_jax.errors import ConfigError, Preempted
from bidirlm_jax.pipeline.variants import (
    BASE,
    BI_CONTRASTIVE,
    BI_MNTP_CONTRASTIVE,
    DIRECTORIES,
    VARIANTS,
    Recipe,
    Variant,
    relative_path,
)

# The grid's variants given as paths (Bi+MNTP -> paths.bi_mntp); the Omni composition is not part of it.
PATH_KEYS = {name: DIRECTORIES[name].replace("-", "_") for name in VARIANTS if name in DIRECTORIES}
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


def unknown_keys(config: ConfigDict, template: ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for key, value in config.items():
        if key not in template:
            out.append(prefix + key)
        elif isinstance(value, ConfigDict) and isinstance(template[key], ConfigDict):
            out += unknown_keys(value, template[key], f"{prefix}{key}.")
    return out


def check_output(workdir: Path) -> None:
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} is a file; give a directory (new, or a previous ablation's)")
    ancestor = workdir.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"--workdir {workdir} lies under {ancestor}, which is a file; choose another directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir {workdir}: {ancestor} is not writable; choose another directory")


def check_study(config: ConfigDict, template: ConfigDict, workdir: str | os.PathLike, name: str) -> Path:
    """A study's config checked for keys `template` lacks (`configs/NAME.py`), and its --workdir for being
    usable; returns the workdir, absolute."""
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"the {name} config must be an ml_collections ConfigDict, got {type(config).__name__}")
    if unknown := unknown_keys(config, template):
        raise ConfigError(f"unknown config key(s) {unknown}; see bidirlm_jax/configs/{name}.py for the valid ones")
    workdir = Path(workdir).expanduser().absolute()
    check_output(workdir)
    return workdir


def check_checkpoint(path: Path, what: str) -> Path:
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

    workdir = check_study(config, get_config("tiny"), workdir, "ablation")
    names = [n.strip() for n in config.variants.split(",") if n.strip()]
    if bad := [n for n in names if n not in VARIANTS]:
        raise ConfigError(f"unknown variant(s) {bad} in config.variants; choose among {', '.join(VARIANTS)}")
    if BASE not in names:
        raise ConfigError("config.variants must include Base: every delta of the table is against it")
    tasks = resolve_tasks(config.tasks)
    given = {n: check_checkpoint(Path(config.paths[k]), f"paths.{k}") for n, k in PATH_KEYS.items() if config.paths[k]}
    if config.base != GENERATE:
        if not config.base:
            raise ConfigError(
                "no base model: set --config.base=HF_DIR (the causal base with its tokenizer), or 'generate' for "
                "a small one pre-trained here on the standard library"
            )
        check_checkpoint(Path(config.base), "base")
    recipe = Recipe(
        mntp=config.mntp,
        contrastive=config.contrastive,
        merge_ratio=config.merge_ratio,
        contrastive_from=config.contrastive_from,
    )
    validate(recipe.mntp)
    validate(recipe.contrastive)
    for task in tasks:  # builds (and so checks) every cell's config, local files included
        validate(task_config(task, config))
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
    from bidirlm_jax.pipeline.timer import Timer

    plan = check(config, workdir)
    plan.workdir.mkdir(parents=True, exist_ok=True)
    cache = plan.workdir / "jax-cache" if config.compilation_cache else None
    with compilation_cache(cache):
        return _run(plan, Timer(echo=echo or (lambda _: None)))


@contextlib.contextmanager
def compilation_cache(directory: Path | None):
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
    config = resolve_generated(copy.deepcopy(plan.config), work / "generated")
    base = generated / "base" if config.base == GENERATE else check_checkpoint(Path(config.base), "base")
    variants = _variants(plan, config, base, timer)
    rows, computed, reused = [], [], []
    for name in plan.variants:
        for task in plan.tasks:
            row, fresh = run_cell(variants[name], task, config, work, timer)
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


def _generate(plan: _Plan, timer) -> Path:
    return generate_data(plan.workdir, plan.config.generate, plan.config.base == GENERATE, timer)


def generate_data(workdir: Path, generate: ConfigDict, with_base: bool, timer) -> Path:
    """`WORKDIR/generated/`: the demo's corpus (data/) and, `with_base`, its pre-trained base (base/) of the
    size `generate` (`configs.sizes.Size` fields); reused when made with the same settings."""
    from bidirlm_jax.configs.sizes import Size
    from bidirlm_jax.io.atomic import atomic_directory
    from bidirlm_jax.pipeline.base import pretrain_base
    from bidirlm_jax.pipeline.corpus import build_corpus, write_data

    out = workdir / "generated"
    settings = {"generate": generate.to_dict(), "base": with_base}
    if reuse(out / "settings.json", settings, "generated data") is not None:
        return out
    size = Size(**generate.to_dict())
    try:
        with atomic_directory(out) as tmp, timer.phase("generated data and base") as note:
            corpus = build_corpus(num_negatives=size.num_negatives, max_eval_queries=size.max_eval_queries)
            write_data(corpus, tmp / "data")
            if with_base:
                pretrain_base(tmp, corpus.train_texts, size=size, timer=timer)
            write_json(tmp / "settings.json", {"settings": settings})
            note["text"] = (
                f"{len(corpus.train_texts)} training docstrings, {len(corpus.eval_data.queries)} held-out queries"
            )
    except Preempted as e:  # the small base's run lay in the temporary directory, now removed
        raise Preempted(e.workdir, e.step, kept=False) from None
    return out


def _variants(plan: _Plan, config: ConfigDict, base: Path, timer) -> dict[str, Variant]:
    from bidirlm_jax.pipeline.variants import build_variants

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
    from bidirlm_jax.data.labeled_synthetic import synthetic_texts
    from bidirlm_jax.evals.registry import validation_split
    from bidirlm_jax.train.evaluation import eval_specs
    from bidirlm_jax.train.objectives.finetune import record_fields

    cfg = task_config(task, config)
    return synthetic_texts(validation_split(cfg, eval_specs(cfg)["validation"], record_fields(cfg)))[:limit]


def _sweep(plan: _Plan, config: ConfigDict, variants: dict[str, Variant], generated: Path | None, timer):
    adapted, base = variants[config.sweep.adapted], variants[BASE]
    path = plan.workdir / "merge_ratio.json"
    settings = {
        "adapted": relative_path(adapted.path, plan.workdir),
        "base": relative_path(base.path, plan.workdir),
        "adapted_files": variant_files(adapted, plan.workdir),  # a rebuilt variant makes the sweep stale
        "base_files": variant_files(base, plan.workdir),
        "ratios": plan.ratios,
        "texts": config.sweep.texts,
        "max_texts": config.sweep.max_texts,
        "score": "mntp masked accuracy",
    }
    if (record := reuse(path, settings, "a merge-ratio sweep")) is not None:
        timer.record("merge-ratio sweep", 0.0, "reused")
        return record["points"], path
    texts = _sweep_texts(plan, config, generated)
    score = mntp_scorer(texts, adapted.tokenizer(), max_length=min(config.mntp.data.seq_len, 512))
    with timer.phase("merge-ratio sweep") as note:
        points = merge_ratio_sweep(adapted.path, base.path, score, ratios=plan.ratios)
        note["text"] = ", ".join(f"{p['ratio']:g}: {100 * p['masked_accuracy']:.1f}" for p in points)
    write_json(path, {"settings": settings, "points": points})
    return points, path
