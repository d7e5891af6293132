"""The downstream tasks of the ablation (paper-recipe §1, §7.1): what each fine-tunes on and what it scores.

| task         | kind                 | score     | data                                                                 |
|--------------|----------------------|-----------|----------------------------------------------------------------------|
| `fruit`      | classification       | accuracy  | generated: does the sentence mention a fruit (`data.labeled`)         |
| `sentiment`  | regression           | Spearman  | generated: share of positive words                                   |
| `names`      | token classification | entity F1 | generated: person and place names (IOB2)                             |
| `docstrings` | retrieval            | nDCG@10   | generated: the demo's held-out stdlib packages, summary line → body  |
| `xnli`       | classification       | accuracy  | `hf:facebook/xnli:en` (premise, hypothesis)                          |
| `pan-x`      | token classification | entity F1 | `hf:google/xtreme:PAN-X.en`                                          |
| `seahorse`   | regression           | Spearman  | local files `{"summary", "article", "label"}` (`task_paths.seahorse_*`)|
| `miracl`     | retrieval            | nDCG@10   | mteb `MIRACLRetrievalHardNegatives`, after contrastive fine-tuning on MS MARCO triplets (`task_paths.msmarco_pairs`) |

Sequence and token tasks are fine-tuning runs of `configs/finetune.py` (the preset the task names, then the
ablation's `finetune.*` settings); the best validation step's score is the cell's. Retrieval tasks are
contrastive fine-tuning runs of `configs/contrastive.py` on the task's training pairs (the paper: 1k steps of
MS MARCO), then a zero-shot retrieval evaluation; `retrieval.steps = 0` evaluates the variant as it is.

Paths beginning with `@generated/` name the data the harness generates from the standard library (the
demo's corpus: training text, mined pairs with their instructions, the held-out BEIR set), so the `tiny`
preset needs no download.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.pipeline.corpus import EVAL_INSTRUCTION as DOCSTRING_INSTRUCTION

GENERATED = "@generated"
KINDS = ("classification", "regression", "token_classification", "retrieval")
METRIC_LABELS = {"accuracy": "accuracy", "spearman": "Spearman", "f1": "entity F1", "ndcg_at_10": "nDCG@10"}


@dataclasses.dataclass(frozen=True)
class Task:
    """One column of the ablation table."""

    name: str
    kind: str
    metric: str  # the key of the score (higher is better)
    preset: str = "tiny"  # configs/finetune.py preset (sequence and token tasks)
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # dotted keys set on that preset
    train_pairs: str = ""  # retrieval: contrastive training data (data.path of configs/contrastive.py)
    evaluation: str = ""  # retrieval: a BEIR directory, or "mteb:TASK"
    instruction: str = ""  # retrieval: the queries' instruction
    paths: tuple[tuple[str, str], ...] = ()  # (task_paths key, dotted key it fills) — local files it needs

    @property
    def label(self) -> str:
        return f"{self.name} ({METRIC_LABELS.get(self.metric, self.metric)})"

    @property
    def generated(self) -> bool:
        """Whether the task reads the generated data."""
        values = [self.train_pairs, self.evaluation, *map(str, self.settings.values())]
        return any(v.startswith(GENERATED) for v in values)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("fruit", "classification", "accuracy", settings={"data.source": "synthetic"}),
        Task("sentiment", "regression", "spearman", settings={"data.source": "synthetic"}),
        Task("names", "token_classification", "f1", settings={"data.source": "synthetic"}),
        Task(
            "docstrings",
            "retrieval",
            "ndcg_at_10",
            train_pairs=f"{GENERATED}/pairs",
            evaluation=f"{GENERATED}/heldout-beir",
            instruction=DOCSTRING_INSTRUCTION,
        ),
        Task("xnli", "classification", "accuracy", preset="xnli"),
        Task("pan-x", "token_classification", "f1", preset="pan-x"),
        Task(
            "seahorse",
            "regression",
            "spearman",
            preset="seahorse",
            paths=(("seahorse_train", "data.path"), ("seahorse_validation", "evals.validation.data")),
        ),
        Task(
            "miracl",
            "retrieval",
            "ndcg_at_10",
            evaluation="mteb:MIRACLRetrievalHardNegatives",
            paths=(("msmarco_pairs", "data.path"),),
        ),
    )
}


def resolve_tasks(names: str | Sequence[str]) -> list[Task]:
    """The tasks a comma-separated list (or a sequence) names, in its order; `ConfigError` for an unknown one."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"no task given; set --config.tasks to some of {', '.join(TASKS)}")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown}; choose among {', '.join(TASKS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"tasks {list(names)} name a task twice")
    return [TASKS[n] for n in names]


def generated_path(value: Any, generated: Path) -> Any:
    """`@generated/X` -> `generated/data/X`; any other value as it is."""
    if isinstance(value, str) and value.startswith(GENERATED):
        return str(generated / "data" / value[len(GENERATED) :].lstrip("/"))
    return value


def resolve_generated(config: ConfigDict, generated: Path) -> ConfigDict:
    """`generated_path` on every string of `config` (in place); returns it."""
    for key, value in config.items():
        if isinstance(value, ConfigDict):
            resolve_generated(value, generated)
        else:
            config[key] = generated_path(value, generated)
    return config


def local_paths(task: Task, task_paths: ConfigDict) -> dict[str, str]:
    """`{dotted key: path}` of the local files `task` reads; `ConfigError` when one is not set."""
    out = {}
    for key, dotted in task.paths:
        value = task_paths.get(key, "") if task_paths is not None else ""
        if not value:
            raise ConfigError(
                f"task {task.name} reads local files: set --config.task_paths.{key}=PATH "
                f"({'records {query, positive, negatives}' if task.kind == 'retrieval' else 'its split'})"
            )
        out[dotted] = value
    return out


def _set(config: ConfigDict, dotted: str, value: Any) -> None:
    node = config
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value


def _apply(config: ConfigDict, overrides: Mapping[str, Any]) -> None:
    """Set the non-empty (non-zero) values of `overrides` (dotted keys)."""
    for dotted, value in overrides.items():
        if value not in (None, "", 0):
            _set(config, dotted, value)


def _schedule(settings: ConfigDict) -> dict[str, Any]:
    """The dotted keys the ablation's `finetune.*` / `retrieval.*` settings fill (10 % warmup, as §7.1)."""
    steps = settings.steps
    tenth = max(1, steps // 10) if steps else 0
    return {
        "train.steps": steps,
        "train.checkpoint_every": steps,
        "train.log_every": tenth,
        "optim.learning_rate": settings.learning_rate,
        "optim.warmup_steps": tenth,
        "data.global_batch_size": settings.batch_size,
        "data.seq_len": settings.seq_len,
    }


def finetune_config(task: Task, settings: ConfigDict, task_paths: ConfigDict) -> ConfigDict:
    """The fine-tuning config of a sequence or token task (`model.*` is set per variant by the harness)."""
    from bidirlm_jax.configs import finetune

    c = finetune.get_config(task.preset)
    c.objective = task.kind
    for dotted, value in {**task.settings, **local_paths(task, task_paths)}.items():
        _set(c, dotted, value)
    _apply(
        c,
        {
            **_schedule(settings),
            "train.seed": settings.seed,
            "evals.validation.every": settings.eval_every,
            "finetune.synthetic_train_size": settings.synthetic_train_size,
            "finetune.synthetic_validation_size": settings.synthetic_validation_size,
            "finetune.classifier": settings.get("classifier", "") if task.kind != "token_classification" else "",
        },
    )
    c.metrics.progress_bar = False
    return c


def retrieval_config(task: Task, template: ConfigDict, settings: ConfigDict, task_paths: ConfigDict) -> ConfigDict:
    """The contrastive fine-tuning config of a retrieval task: `template` (the recipe's contrastive config:
    its model settings and instructions) on the task's pairs, with the ablation's `retrieval.*` settings."""
    c = copy.deepcopy(template)
    if task.train_pairs:
        c.data.path = task.train_pairs
    elif task.paths:  # the task's own pairs: the recipe's instructions name other datasets
        c.contrastive.instructions = ""
    for dotted, value in local_paths(task, task_paths).items():
        _set(c, dotted, value)
    _apply(c, _schedule(settings))
    c.metrics.progress_bar = False
    return c
