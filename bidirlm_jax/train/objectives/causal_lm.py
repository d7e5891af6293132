"""Causal language modelling (next-token prediction): pre-training or continued pre-training of a decoder.

Data: a 1-D token stream (`data.source`: `synthetic`, generated; `npy`, a memory-mapped array of ids)
cut into `data.seq_len` windows (`data.token_windows`), or documents packed with their segments (`text`, `stdlib`:
see `objectives.text`; each document attends only to itself).
"""

from __future__ import annotations

from pathlib import Path

from ml_collections import ConfigDict

from bidirlm_jax.data.token_windows import lm_rows, load_tokens
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.losses.causal_lm import causal_lm_loss
from bidirlm_jax.models.config import ModelConfig
from bidirlm_jax.train.config import run_settings
from bidirlm_jax.train.metrics import training_flops_per_token
from bidirlm_jax.train.objectives.base import (
    LossFn,
    Objective,
    check_data_path,
    run_tokenizer,
    token_sum_grads,
)
from bidirlm_jax.train.objectives.text import SOURCES as TEXT_SOURCES
from bidirlm_jax.train.objectives.text import packed_text

SOURCES = ("synthetic", "npy", *TEXT_SOURCES)


def build(config: ConfigDict, model: ModelConfig, *, workdir: Path, loss_fn: LossFn | None = None) -> Objective:
    """The causal-LM objective of a run; `loss_fn` replaces the next-token loss (same data)."""
    data = config.data
    if data.source not in SOURCES:
        raise ConfigError(f"data.source={data.source!r} is not one of {SOURCES} for objective causal_lm")
    check_data_path(data)
    tokenizer = None
    if data.source in TEXT_SOURCES:
        tokenizer = run_tokenizer(config, model, workdir)
        rows = packed_text(data, tokenizer, model.vocab_size).rows
    else:
        tokens = load_tokens(data, model.vocab_size)
        rows = lm_rows(tokens, seq_len=data.seq_len, global_batch=data.global_batch_size, seed=data.seed)
    tokens_per_step = data.global_batch_size * data.seq_len
    return Objective(
        rows=rows,
        grad_fn=token_sum_grads(loss_fn or causal_lm_loss, grad_accum=config.train.grad_accum_steps),
        flops_per_step=training_flops_per_token(model, data.seq_len, runtime=run_settings(config.model))
        * tokens_per_step,
        tokens_per_step=tokens_per_step,
        tokenizer=tokenizer,
        key_metric="accuracy",
    )
