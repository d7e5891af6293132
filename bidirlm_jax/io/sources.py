"""What a model directory holds, which decides how the user verbs read it."""

from __future__ import annotations

import enum
import os
from pathlib import Path

from bidirlm_jax.io.checkpoint import is_checkpoint
from bidirlm_jax.io.run import head_file, is_training_run


class Source(enum.Enum):
    """The kinds of directories `from_pretrained`, `convert`, `export` and `merge` read."""

    HF = "Hugging Face directory"  # safetensors or pytorch_model.bin + config.json (ours when exported)
    CHECKPOINT = "bidirlm checkpoint"  # `bidirlm convert`: orbax params/ + config.json
    RUN = "training run"  # `bidirlm train --workdir`: its latest step's parameters
    FINETUNE_RUN = "fine-tuning run"  # a training run of an encoder with a task head (io.heads)


def source_of(path: str | os.PathLike) -> Source:
    """The kind of `path`; anything that is not ours is read as an HF directory (which reports what it lacks)."""
    path = Path(path)
    if is_training_run(path):
        return Source.FINETUNE_RUN if head_file(path).is_file() else Source.RUN
    return Source.CHECKPOINT if is_checkpoint(path) else Source.HF
