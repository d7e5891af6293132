"""The MNTP loss: masked next-token prediction (BidirLM, after LLM2Vec), shared by training
(`train.objectives.mntp`) and held-out scoring (`evals.lm`), so both score exactly alike.

Masked tokens are replaced in the input (`data.mntp`); the masked token at position i is predicted by
the LM head from the hidden state at i−1 of the *same* document piece. The shift happens exactly once,
here, and never crosses a segment boundary (the two traps of the authors' code: a second shift inside a
`…ForCausalLM` loss, and packed documents mis-segmented after the shift). Only masked targets score.

The sparse head (default) gathers, per row, the hidden states that predict a masked token into a buffer
of fixed capacity ⌈capacity_factor·ratio·T⌉ and runs the vocabulary-chunked LM head + cross-entropy
(`kernels.cross_entropy`) there only: with 30 % masking it skips ~70 % of the head's FLOPs and never
holds `[tokens, vocab]` logits. Targets beyond a row's capacity are dropped from the loss and counted
in `mntp_overflow`. `sparse=False` is the dense reference path (full logits, nothing dropped).

Sums returned (`losses.base`): the item count is the number of scored masked targets; metric sums are
`masked_accuracy` (correct targets), `mntp_overflow` (dropped targets) and, with `num_sources`,
`loss/source_{k}` and `tokens/source_{k}` per mixture source.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bidirlm_jax.data.mntp import mask_tokens, validate
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.kernels.cross_entropy import chunked_cross_entropy
from bidirlm_jax.losses.base import Batch, LossFn


class Targets(NamedTuple):
    """Per-target results, `K` slots per row (`K = T` on the dense path, the capacity on the sparse one)."""

    loss: jax.Array  # [B, K] fp32 cross-entropy, meaningful where `weight` is 1
    correct: jax.Array  # [B, K] fp32, 1 where the argmax is the target
    weight: jax.Array  # [B, K] fp32, 1 for a scored target, 0 for an empty slot
    position: jax.Array  # [B, K] int32, the predicting position j (its target sits at j + 1)
    overflow: jax.Array  # [B] int32, masked targets dropped for lack of slots


def capacity(seq_len: int, ratio: float, capacity_factor: float) -> int:
    """Slots per row of the sparse head: ⌈factor·ratio·T⌉, at most the T−1 positions that can predict."""
    return max(1, min(seq_len - 1, math.ceil(capacity_factor * ratio * seq_len)))


def next_token_targets(input_ids: jax.Array, masked: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(targets [B, T], predicts bool [B, T]): position j predicts `input_ids[j + 1]` when that token is
    masked and both lie in the same (non-padding) segment; the last position predicts nothing."""
    same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
    predicts = jnp.pad(masked[:, 1:] & same, ((0, 0), (0, 1)))
    targets = jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)))
    return targets, predicts


def _segments(batch: Batch) -> jax.Array:
    """Packed rows carry `segment_ids`; a plain padded batch is one segment per row, padding excluded."""
    if "segment_ids" in batch:
        return jnp.asarray(batch["segment_ids"])
    ids = jnp.asarray(batch["input_ids"])
    mask = batch.get("attention_mask")
    return jnp.ones(ids.shape, jnp.int32) if mask is None else jnp.asarray(mask, jnp.int32)


def _lm_head(model: nnx.Module, dtype) -> jax.Array:
    """The LM head [V, d] as `Transformer.logits` applies it (tied embedding or `lm_head`, compute dtype)."""
    return model.lm_head_weight()[...].astype(dtype)


def _dense(model: nnx.Module, hidden: jax.Array, targets: jax.Array, predicts: jax.Array) -> Targets:
    logits = model.logits(hidden)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    b, t = targets.shape
    position = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return Targets(loss, correct, predicts.astype(jnp.float32), position, jnp.zeros((b,), jnp.int32))


def _sparse(model, hidden, targets, predicts, *, slots: int, chunk_size: int) -> Targets:
    position = jax.vmap(lambda p: jnp.nonzero(p, size=slots, fill_value=0)[0])(predicts).astype(jnp.int32)
    per_row = predicts.sum(axis=1, dtype=jnp.int32)
    weight = (jnp.arange(slots)[None, :] < per_row[:, None]).astype(jnp.float32)
    h = jnp.take_along_axis(hidden, position[..., None], axis=1).reshape(-1, hidden.shape[-1])
    t = jnp.take_along_axis(targets, position, axis=1).reshape(-1)
    loss, correct = chunked_cross_entropy(
        h, _lm_head(model, hidden.dtype), t, chunk_size=chunk_size, softcap=model.config.final_logit_softcapping
    )
    shape = position.shape
    return Targets(
        loss.reshape(shape),
        correct.reshape(shape).astype(jnp.float32),
        weight,
        position,
        jnp.maximum(per_row - slots, 0),
    )


def target_losses(
    model: nnx.Module,
    batch: Batch,
    corrupted: jax.Array,
    masked: jax.Array,
    *,
    slots: int | None = None,
    chunk_size: int = 8192,
) -> Targets:
    """Run the encoder on `corrupted` and score every masked target of `batch["input_ids"]`.

    `slots=None` is the dense head; an integer is the sparse head's per-row capacity. The model's
    attention mode (bidirectional for MNTP) is the caller's choice.
    """
    ids = jnp.asarray(batch["input_ids"])
    segments = _segments(batch)
    hidden = model.hidden_states(
        corrupted, batch.get("attention_mask"), segment_ids=batch.get("segment_ids"), positions=batch.get("positions")
    )
    targets, predicts = next_token_targets(ids, jnp.asarray(masked, bool), segments)
    if slots is None:
        return _dense(model, hidden, targets, predicts)
    return _sparse(model, hidden, targets, predicts, slots=slots, chunk_size=chunk_size)


def _sums(scored: Targets, batch: Batch, num_sources: int) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    row_loss = jnp.sum(scored.loss * scored.weight, axis=1)
    row_count = jnp.sum(scored.weight, axis=1)
    metrics = {
        "masked_accuracy": jnp.sum(scored.correct * scored.weight),
        "mntp_overflow": jnp.sum(scored.overflow).astype(jnp.float32),
    }
    if num_sources:
        if "source" not in batch:
            raise ConfigError("num_sources is set but the batch has no `source` field; feed a mixture's batches")
        onehot = jax.nn.one_hot(batch["source"], num_sources, dtype=jnp.float32)  # [B, S]
        for k, (loss, count) in enumerate(zip(onehot.T @ row_loss, onehot.T @ row_count)):
            metrics[f"loss/source_{k}"] = loss
            metrics[f"tokens/source_{k}"] = count
    return jnp.sum(row_loss), jnp.sum(row_count), metrics


def mntp_loss_from_mask(
    model: nnx.Module,
    batch: Batch,
    corrupted: jax.Array,
    masked: jax.Array,
    *,
    slots: int | None = None,
    chunk_size: int = 8192,
    num_sources: int = 0,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """The objective's `(loss_sum, masked_count, metric_sums)` for explicit masks (no randomness)."""
    scored = target_losses(model, batch, corrupted, masked, slots=slots, chunk_size=chunk_size)
    return _sums(scored, batch, num_sources)


def make_mntp_loss(
    *,
    mask_id: int,
    ratio: float,
    vocab_size: int,
    strategy: str = "mask",
    special_ids: Sequence[int] = (),
    capacity_factor: float = 1.2,
    chunk_size: int = 8192,
    sparse: bool = True,
    num_sources: int = 0,
) -> LossFn:
    """`loss_fn(model, batch, rng)`: mask `batch["input_ids"]` where `batch["maskable"]` allows (on device,
    from `rng`), then score the masked tokens. Settings are checked here, before any compute."""
    validate(ratio=ratio, mask_id=mask_id, vocab_size=vocab_size, strategy=strategy)
    if capacity_factor <= 0 or chunk_size <= 0:
        raise ConfigError(f"mntp capacity_factor ({capacity_factor}) and chunk_size ({chunk_size}) must be positive")

    def loss_fn(model: nnx.Module, batch: Batch, rng: jax.Array):
        ids = jnp.asarray(batch["input_ids"])
        corrupted, masked = mask_tokens(
            rng,
            ids,
            batch["maskable"],
            ratio=ratio,
            mask_id=mask_id,
            vocab_size=vocab_size,
            strategy=strategy,
            special_ids=special_ids,
        )
        slots = capacity(ids.shape[1], ratio, capacity_factor) if sparse else None
        return mntp_loss_from_mask(
            model, batch, corrupted, masked, slots=slots, chunk_size=chunk_size, num_sources=num_sources
        )

    return loss_fn
