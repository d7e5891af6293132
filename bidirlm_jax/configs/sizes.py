"""The tiny pipeline's sizes (`Size`: model shape, steps and batches; `FULL` for `bidirlm demo`, `QUICK` for
`--quick` and tests) and the training configs of its stages: the base's causal LM, the variants' MNTP and
contrastive runs (this package's `lm`, `mntp` and `contrastive` presets on the generated data).

Not a config file (no `get_config`): it lives with the configs because `ablation.py`'s `tiny` preset is
built from it and the pipeline (`bidirlm_jax.pipeline`) takes its recipes from the configs, so the configs
stay below the pipeline.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from bidirlm_jax.configs import contrastive, lm, mntp


@dataclasses.dataclass(frozen=True)
class Size:
    """Model shape, steps and batches of one demo run (`FULL`: ~5 minutes on two idle cores, ~12 with Omni)."""

    family: str = "gemma3"  # the base's shape: "gemma3", or "qwen3" (the Omni stage composes Qwen3 backbones)
    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 4  # Gemma3's sliding/global alternation, every other layer global
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    sliding_window: int = 32
    seq_len: int = 128
    lm_steps: int = 300
    lm_batch: int = 32
    lm_learning_rate: float = 3e-3
    mntp_steps: int = 100
    mntp_batch: int = 32
    mntp_learning_rate: float = 1e-3
    contrastive_steps: int = 100
    contrastive_batch: int = 32
    contrastive_seq_len: int = 64
    contrastive_learning_rate: float = 1e-3
    num_negatives: int = 1
    max_eval_queries: int = 400
    # The Omni stage (`pipeline.omni`): specialists' and Omni's contrastive runs, the media budget
    specialist_steps: int = 80
    omni_steps: int = 120
    omni_batch: int = 16
    omni_seq_len: int = 96
    omni_learning_rate: float = 1e-3
    max_pixels: int = 128 * 128
    max_seconds: float = 4.0
    image_crops: int = 6  # training crops per photograph (2 more, of another seed, are held out)
    speech_variants: int = 6  # training renderings per sentence (2 more are held out)


FULL = Size()
QUICK = Size(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    seq_len=64,
    lm_steps=6,
    lm_batch=8,
    mntp_steps=4,
    mntp_batch=8,
    contrastive_steps=4,
    contrastive_batch=8,
    contrastive_seq_len=48,
    max_eval_queries=48,
    specialist_steps=3,
    omni_steps=3,
    omni_batch=8,
    image_crops=1,
    speech_variants=1,
)

# The studies' shared config sections (`configs/ablation.py`, `configs/specialists.py`):
# `generate.*`, the generated base of their `tiny` presets (`Size` fields) ...
TINY_BASE = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    sliding_window=16,
    seq_len=64,
    lm_steps=60,
    lm_batch=16,
    lm_learning_rate=3e-3,
    num_negatives=1,
    max_eval_queries=120,
)
# ... and `finetune.*`, the schedule set on a task's `configs/finetune.py` preset (0 or "" keeps the preset's)
FINETUNE_SCHEDULE = dict(
    steps=0,
    learning_rate=0.0,
    batch_size=0,
    seq_len=0,
    eval_every=0,
    seed=0,
    synthetic_train_size=0,
    synthetic_validation_size=0,
    classifier="eurobert",  # sequence tasks' head (models.heads): eurobert | linear | auto
)


def lm_config(size: Size, init_dir: Path, tokens: Path, progress: bool):
    """The base's causal-LM pre-training config (`configs/lm.py`'s `tiny`) on the token stream `tokens`."""
    c = lm.get_config("tiny")
    c.model.init_from = str(init_dir)
    c.data.update(source="npy", path=str(tokens), seq_len=size.seq_len, global_batch_size=size.lm_batch, seed=0)
    c.optim.update(
        learning_rate=size.lm_learning_rate,
        warmup_steps=max(1, size.lm_steps // 15),
        decay_fraction=0.2,
        weight_decay=0.0,
    )
    c.train.update(steps=size.lm_steps, checkpoint_every=size.lm_steps, log_every=max(1, size.lm_steps // 30))
    c.metrics.progress_bar = progress
    return c


def stage_configs(size: Size, data_dir: Path, tokenizer: Path | None, progress: bool = False) -> tuple[Any, Any]:
    """The MNTP and contrastive training configs of the variants (`configs/mntp.py`, `configs/contrastive.py`
    presets, on the demo's data); `tokenizer` None = the base checkpoint's own."""
    m = mntp.get_config("tiny")
    m.data.update(
        source="text",
        path=str(data_dir / "train_text.jsonl"),
        seq_len=size.seq_len,
        global_batch_size=size.mntp_batch,
        seed=0,
        tokenizer=str(tokenizer or ""),
    )
    m.mntp.chunk_size = 8192
    m.optim.update(
        learning_rate=size.mntp_learning_rate,
        warmup_steps=max(1, size.mntp_steps // 10),
        decay_fraction=0.2,
        weight_decay=0.0,
    )
    m.train.update(steps=size.mntp_steps, checkpoint_every=size.mntp_steps, log_every=max(1, size.mntp_steps // 20))
    m.metrics.progress_bar = progress
    c = contrastive.get_config("tiny")
    c.data.update(
        source="pairs",
        path=str(data_dir / "pairs"),
        seq_len=size.contrastive_seq_len,
        global_batch_size=size.contrastive_batch,
        seed=0,
        tokenizer=str(tokenizer or ""),
    )
    c.contrastive.update(
        num_negatives=size.num_negatives, chunk_size=0, instructions=str(data_dir / "instructions.json")
    )
    c.optim.update(
        learning_rate=size.contrastive_learning_rate,
        warmup_steps=max(1, size.contrastive_steps // 10),
        weight_decay=0.0,
    )
    c.train.update(
        steps=size.contrastive_steps,
        checkpoint_every=size.contrastive_steps,
        log_every=max(1, size.contrastive_steps // 20),
    )
    c.metrics.progress_bar = progress
    return m, c
