"""Causal language modelling (next-token prediction): pre-training or continued pre-training of a decoder.

Data: a 1-D token stream (`data.source`: `synthetic`, generated; `npy`, a memory-mapped array of ids)
cut into `data.seq_len` windows (`data.token_windows`), or documents packed with their segments (`text`, `stdlib`:
see `objectives.text`; each document attends only to itself).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from ml_collections import ConfigDict

from bidirlm_jax.data.token_windows import lm_rows, load_tokens
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models.config import ModelConfig
from bidirlm_jax.train.metrics import training_flops_per_token
from bidirlm_jax.train.objectives.base import (
    Batch,
    LossFn,
    Objective,
    check_data_path,
    run_tokenizer,
    token_sum_grads,
)
from bidirlm_jax.train.objectives.text import SOURCES as TEXT_SOURCES
from bidirlm_jax.train.objectives.text import packed_text

SOURCES = ("synthetic", "npy", *TEXT_SOURCES)


def causal_lm_loss(
    model: nnx.Module, batch: Batch, rng: jax.Array
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Next-token cross-entropy in fp32. `batch`: `input_ids` [B, T] and optionally `attention_mask`,
    `segment_ids`, `positions`; a target is scored only when it and its context token are real tokens
    of the same segment."""
    del rng
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    segments = batch.get("segment_ids")
    hidden = model.hidden_states(ids, mask, segment_ids=segments, positions=batch.get("positions"))
    logits = model.logits(hidden[:, :-1]).astype(jnp.float32)  # the last position predicts nothing
    targets = ids[:, 1:]
    weight = jnp.ones(targets.shape, jnp.float32)
    if mask is not None:
        weight = weight * (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
    if segments is not None:
        weight = weight * (segments[:, 1:] == segments[:, :-1]).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(losses * weight), jnp.sum(weight), {"accuracy": jnp.sum(correct * weight)}


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
        flops_per_step=training_flops_per_token(model, data.seq_len) * tokens_per_step,
        tokens_per_step=tokens_per_step,
        tokenizer=tokenizer,
        key_metric="accuracy",
    )
