"""The evaluators a run's `config.evals` entries name by `kind` (big_vision's registry): each a factory
`(name, spec, config, objective) -> Evaluator | None` that reads and checks its data once, before training
starts, and returns the scoring of a model. `bidirlm train`, the pipeline and the ablation harness hand
`EVALUATORS` to the engine (`train.loop.train(..., evaluators=EVALUATORS)`), which schedules them
(`train.evaluation`); nothing here imports `train/`. The objective is read for what it built: its
`tokenizer`, and for fine-tuning its `label_map` and record `fields`.

Kinds:
- `mntp`: held-out MNTP loss and masked accuracy per set (`data="NAME:PATH;…"`, the first `texts` documents of
  each) → `loss/NAME`, `masked_accuracy/NAME`, `truncated_texts/NAME`, the measure of forgetting;
- `retrieval`: nDCG@10, MRR@10, Recall@100 on a BEIR directory (`data`, its `split`), queries with the entry's
  `instruction`, pooled as the run pools (`contrastive.pooling`); `best_metric` (optional) keeps the best step;
- `finetune`: a fine-tuned head's validation scores (`data`: a file or directory; `auto`: the training
  dataset's `split` for `hf:` sources, a generated split for synthetic and generated media ones; media rows
  rendered by the objective's `processor`) → the task's metrics, `loss`,
  `examples`, `truncated`; `best_metric` (default: the task's) picks the step kept in `RUN/best/`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx
from ml_collections import ConfigDict

from bidirlm_jax.data.labeled import Fields, LabeledSplit, check_labels, read_split
from bidirlm_jax.data.labeled_media import GENERATED, encode_labeled, generated_split
from bidirlm_jax.data.labeled_synthetic import synthetic_split
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.evals.finetune import evaluate_encoded
from bidirlm_jax.evals.lm import evaluate_domains, read_domains
from bidirlm_jax.evals.metrics import BEST_METRIC, TASK_METRICS
from bidirlm_jax.evals.retrieval import evaluate_retrieval, load_beir
from bidirlm_jax.io.tokenizer import pad_id


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """One configured evaluation: `run(model)` → scores, every `every` steps (0: the last only)."""

    name: str
    run: Callable[[nnx.Module], Mapping[str, float]]
    every: int = 0
    best_metric: str = ""  # the score whose best step is kept (higher is better); "" for none
    prefix: str = ""  # logged as eval/<prefix><key>: several evaluations of one kind in a run stay apart

    def __call__(self, model: nnx.Module) -> Mapping[str, float]:
        return self.run(model)


def mntp_held_out(name: str, spec: ConfigDict, config: ConfigDict, objective: Any) -> Evaluator:
    """Held-out MNTP sets, masked as the run masks (its ratio, its tokenizer's mask token)."""
    domains = read_domains(spec.data, max_texts=int(spec.get("texts", 256)), text_field=config.data.text_field)
    tokenizer = objective.tokenizer
    ratio = spec.get("mask_ratio") or (config.mntp.mask_ratio if "mntp" in config else 0.3)
    run = functools.partial(
        evaluate_domains,
        tokenizer=tokenizer,
        domains=domains,
        mask_ratio=ratio,
        mask_token=tokenizer.mask_token_id if tokenizer.mask_token is not None else "auto",
        max_length=config.data.seq_len,
        seed=config.data.seed,
    )
    return Evaluator(name, run, every=int(spec.get("every", 0)))


def validation_split(config: ConfigDict, spec: ConfigDict, fields: Fields) -> LabeledSplit:
    """The labeled split a `finetune` entry scores on (see the module doc)."""
    task, data = config.objective, config.data
    size = config.finetune.synthetic_validation_size
    if data.source == "synthetic":
        return synthetic_split(task, size, seed=data.seed, name="validation")
    if data.source in GENERATED:  # other crops / renderings than the training split's
        return generated_split(data.source, task, size, seed=data.seed + 1, name="validation")
    path = spec.data
    if path == "auto":
        if not data.path.startswith("hf:"):
            raise ConfigError(
                "fine-tuning evaluates on a validation split: set --config.evals.validation.data=FILE_OR_DIR "
                "(hf: sources default to their evals.validation.split)"
            )
        path = data.path
    return read_split(path, task, fields=fields, split=spec.get("split", "validation"), name="validation")


def finetune_validation(name: str, spec: ConfigDict, config: ConfigDict, objective: Any) -> Evaluator:
    """A fine-tuned head's scores on a labeled split, its labels checked against the run's label map now.

    The entry `validation` logs `eval/<metric>` and keeps the best step (by the task's metric unless
    `best_metric` says otherwise); any other entry (a test set: `evals.aegis = {kind: finetune, data: ...}`)
    logs `eval/<name>/<metric>` and keeps nothing unless it names a `best_metric`."""
    task = config.objective
    if task not in BEST_METRIC:
        raise ConfigError(f"evals.{name}.kind=finetune scores fine-tuning runs; objective {task!r} is not one")
    main = name == "validation"
    best = spec.get("best_metric") or (BEST_METRIC[task] if main else "")
    allowed = tuple(m for m in TASK_METRICS[task] if m != "mse")
    if best and best not in allowed:
        raise ConfigError(f"evals.{name}.best_metric={best!r} is not one of {allowed} (higher is better) for {task}")
    batch_size = int(spec.get("batch_size", 32))
    if batch_size <= 0:
        raise ConfigError(f"evals.{name}.batch_size must be positive, got {batch_size}")
    split = validation_split(config, spec, objective.fields)
    check_labels(split, objective.label_map)
    tokenizer, seq_len, separator = objective.tokenizer, config.data.seq_len, config.finetune.word_separator
    encoded = encode_labeled(
        split,
        tokenizer,
        objective.label_map,
        max_length=seq_len,
        word_separator=separator,
        processor=getattr(objective, "processor", None),
    )
    run = functools.partial(
        evaluate_encoded, encoded=encoded, label_map=objective.label_map, pad=pad_id(tokenizer), batch_size=batch_size
    )
    return Evaluator(name, run, every=int(spec.get("every", 0)), best_metric=best, prefix="" if main else f"{name}/")


RETRIEVAL_METRICS = ("ndcg_at_10", "mrr_at_10", "recall_at_100")


def retrieval(name: str, spec: ConfigDict, config: ConfigDict, objective: Any) -> Evaluator:
    """Retrieval on a BEIR split during (contrastive) training, the data read and checked now."""
    best = spec.get("best_metric", "")
    if best and best not in RETRIEVAL_METRICS:
        raise ConfigError(f"evals.{name}.best_metric={best!r} is not one of {RETRIEVAL_METRICS} (or empty)")
    run = functools.partial(
        evaluate_retrieval,
        tokenizer=objective.tokenizer,
        data=load_beir(spec.data, spec.get("split", "test")),
        instruction=spec.get("instruction") or None,
        pooling=config.contrastive.pooling if "contrastive" in config else "mean",
        batch_size=int(spec.get("batch_size", 32)),
        max_length=config.data.seq_len,
        progress=False,
    )
    return Evaluator(name, run, every=int(spec.get("every", 0)), best_metric=best)


EVALUATORS: dict[str, Callable[[str, ConfigDict, ConfigDict, Any], Evaluator | None]] = {
    "mntp": mntp_held_out,
    "finetune": finetune_validation,
    "retrieval": retrieval,
}
