"""A training run's directory (`bidirlm train --workdir RUN`): the one module that names its parts.

RUN/model/          config.json, the run's tokenizer files, (fine-tuning) head.json, (contrastive)
                    prompts.json, the query prompts its datasets trained with, and (LoRA) lora.json: what
                    `from_pretrained(RUN)` and the exports read besides the weights
RUN/checkpoints/N/  one directory per committed step (orbax): `state/` (params, optimizer state, step,
                    RNG) and `meta/` (JSON: shapes, the data stream, the run's config)
RUN/best/           fine-tuning's best validation step: params/ and best.json
RUN/metrics.jsonl   one JSON object per logged step

Every module that reads or writes a run takes these paths from here.
"""

from __future__ import annotations

import os
from pathlib import Path

RUN_MODEL_DIR = "model"
RUN_CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
BEST_FILE = "best.json"
HEAD_FILE = "head.json"  # in the run's `model/` directory
LORA_FILE = "lora.json"  # in `model/`: a LoRA run's adapter settings and base (`train.lora.describe`)
PROMPTS_FILE = "prompts.json"  # in `model/`: {"prompts": {name: prefix}}, what an encoder export names its prompts
METRICS_FILE = "metrics.jsonl"
STATE_ITEM = "state"  # in a step directory: the train state
META_ITEM = "meta"  # in a step directory: the step's JSON description
BEST_PARAMS_DIR = "params"  # in `best/`
TOKENIZER_FILE = "tokenizer.json"  # in `model/`: present once the run saved its tokenizer


def model_dir(run: str | os.PathLike) -> Path:
    return Path(run) / RUN_MODEL_DIR


def checkpoints_dir(run: str | os.PathLike) -> Path:
    return Path(run) / RUN_CHECKPOINTS_DIR


def best_dir(run: str | os.PathLike) -> Path:
    return Path(run) / BEST_DIR


def step_dir(run: str | os.PathLike, step: int) -> Path:
    return checkpoints_dir(run) / str(step)


def state_dir(run: str | os.PathLike, step: int) -> Path:
    return step_dir(run, step) / STATE_ITEM


def meta_dir(run: str | os.PathLike, step: int) -> Path:
    return step_dir(run, step) / META_ITEM


def best_params_dir(run: str | os.PathLike) -> Path:
    return best_dir(run) / BEST_PARAMS_DIR


def best_file(run: str | os.PathLike) -> Path:
    return best_dir(run) / BEST_FILE


def head_file(run: str | os.PathLike) -> Path:
    return model_dir(run) / HEAD_FILE


def lora_file(run: str | os.PathLike) -> Path:
    return model_dir(run) / LORA_FILE


def prompts_file(run: str | os.PathLike) -> Path:
    return model_dir(run) / PROMPTS_FILE


def saved_tokenizer(run: str | os.PathLike) -> Path | None:
    """The directory holding the tokenizer the run saved (`model/`, written with its config at the first
    step), or None before it did: a resumed run reads its own from there."""
    where = model_dir(run)
    return where if (where / TOKENIZER_FILE).is_file() else None


def metrics_file(run: str | os.PathLike) -> Path:
    return Path(run) / METRICS_FILE


def is_training_run(path: str | os.PathLike) -> bool:
    return checkpoints_dir(path).is_dir() and (model_dir(path) / "config.json").is_file()


def description_dir(path: str | os.PathLike) -> Path:
    """Where `path`'s config.json and tokenizer files are: a run's `model/`, else the directory itself."""
    return model_dir(path) if is_training_run(path) else Path(path)
