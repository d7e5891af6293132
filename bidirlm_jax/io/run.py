"""A training run's directory (`bidirlm train --workdir RUN`): the one module that names its parts.

RUN/model/          config.json, the run's tokenizer files, (fine-tuning) head.json and (contrastive)
                    prompts.json, the query prompts its datasets trained with: what
                    `from_pretrained(RUN)` and the exports read besides the weights
RUN/checkpoints/N/  orbax train states, one directory per step
RUN/best/           fine-tuning's best validation step: params/ and best.json
RUN/metrics.jsonl   one JSON object per logged step
"""

from __future__ import annotations

import os
from pathlib import Path

RUN_MODEL_DIR = "model"
RUN_CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
BEST_FILE = "best.json"
HEAD_FILE = "head.json"  # in the run's `model/` directory
PROMPTS_FILE = "prompts.json"  # in `model/`: {"prompts": {name: prefix}}, what an encoder export names its prompts
METRICS_FILE = "metrics.jsonl"


def model_dir(run: str | os.PathLike) -> Path:
    return Path(run) / RUN_MODEL_DIR


def checkpoints_dir(run: str | os.PathLike) -> Path:
    return Path(run) / RUN_CHECKPOINTS_DIR


def best_dir(run: str | os.PathLike) -> Path:
    return Path(run) / BEST_DIR


def head_file(run: str | os.PathLike) -> Path:
    return model_dir(run) / HEAD_FILE


def metrics_file(run: str | os.PathLike) -> Path:
    return Path(run) / METRICS_FILE


def is_training_run(path: str | os.PathLike) -> bool:
    return checkpoints_dir(path).is_dir() and (model_dir(path) / "config.json").is_file()


def description_dir(path: str | os.PathLike) -> Path:
    """Where `path`'s config.json and tokenizer files are: a run's `model/`, else the directory itself."""
    return model_dir(path) if is_training_run(path) else Path(path)
