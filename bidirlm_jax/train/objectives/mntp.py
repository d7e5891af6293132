"""The MNTP objective: masked next-token prediction (BidirLM, after LLM2Vec).

Masked tokens are replaced in the input (`data.mntp`); the masked token at position i is predicted by
the LM head from the hidden state at i−1 of the *same* document piece. The shift happens exactly once,
here, and never crosses a segment boundary (the two traps of the authors' code: a second shift inside a
`…ForCausalLM` loss, and packed documents mis-segmented after the shift). Only masked targets score.

The sparse head (default) gathers, per row, the hidden states that predict a masked token into a buffer
of fixed capacity ⌈capacity_factor·ratio·T⌉ and runs the vocabulary-chunked LM head + cross-entropy
(`kernels.cross_entropy`) there only: with 30 % masking it skips ~70 % of the head's FLOPs and never
holds `[tokens, vocab]` logits. Targets beyond a row's capacity are dropped from the loss and counted
in `mntp_overflow`. `sparse=False` is the dense reference path (full logits, nothing dropped).

`build` assembles the objective of a run: the tokenizer (the checkpoint's, `data.tokenizer`, or for the
built-in `stdlib` text one trained on it), the packed corpus or weighted mixture (`data.packing`,
`data.mixture`), the mask id (`mntp.mask_token`) and this loss.

Metric contract (see `base.token_sum_grads` for the engine's sums-then-divide convention): the token count is the
number of scored masked targets, so the engine's `loss` is the mean over masked tokens across
micro-batches and devices. Sums returned: `masked_accuracy` (correct targets), `mntp_overflow` (dropped
targets) and, with `num_sources`, `loss/source_{k}` and `tokens/source_{k}` per mixture source.
`logged_metrics` turns the engine's token means back into the values worth logging. Held-out sets
(`mntp.eval_data`) add `eval/loss/NAME`, `eval/masked_accuracy/NAME` and `eval/truncated_texts/NAME` (texts
longer than `data.seq_len`, cut) every `mntp.eval_every` steps.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from ml_collections import ConfigDict

from bidirlm_jax.data.mntp import mask_tokens, validate
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.tokenizer import resolve_mask_token
from bidirlm_jax.kernels.cross_entropy import chunked_cross_entropy
from bidirlm_jax.models.config import ModelConfig
from bidirlm_jax.train.metrics import training_flops_per_token
from bidirlm_jax.train.objectives.base import Batch, LossFn, Objective, run_tokenizer, token_sum_grads
from bidirlm_jax.train.objectives.text import packed_text


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


def logged_metrics(means: Mapping[str, float], num_sources: int = 0) -> dict[str, float]:
    """The engine's step metrics (every objective sum divided by `tokens`, the masked-target count) →
    what to log: `masked_tokens` (the engine's `tokens`, renamed: MNTP's count is of masked targets, not
    of the step's tokens) and `mntp_overflow` as counts per step, `loss/source_{k}` as that source's mean
    loss (NaN when it had no target this step) and `tokens/source_{k}` as its count."""
    tokens = float(means["tokens"])
    out = {k: float(v) for k, v in means.items() if k != "tokens"}
    out["masked_tokens"] = tokens
    out["mntp_overflow"] = float(round(float(means["mntp_overflow"]) * tokens))
    for k in range(num_sources):
        share = float(means[f"tokens/source_{k}"])
        out[f"loss/source_{k}"] = float(means[f"loss/source_{k}"]) / share if share > 0 else math.nan
        out[f"tokens/source_{k}"] = float(round(share * tokens))
    return out


# --- the objective of a run ---------------------------------------------------------------------------


def mntp_flops_per_step(model: ModelConfig, seq_len: int, rows: int, head_slots: int | None) -> float:
    """Training FLOPs of a step: the body on every token, the LM head only on the slots the sparse head
    runs (every position on the dense path)."""
    head = 6.0 * model.hidden_size * model.vocab_size  # forward + backward of one position's logits
    body = training_flops_per_token(model, seq_len) - head
    return rows * (seq_len * body + (head_slots if head_slots is not None else seq_len) * head)


def build(config: ConfigDict, model: ModelConfig, *, workdir: Path) -> Objective:
    """The MNTP objective of a run, every input checked before anything is computed or written."""
    data, mntp = config.data, config.mntp
    tokenizer = run_tokenizer(config, model, workdir)
    mask_id = resolve_mask_token(tokenizer, mntp.mask_token, family=model.family)
    # Recorded before the text is packed, so the mask token is special (never a target) as it is for the
    # tokenizer saved with the run, which a resumed run loads: both pack the same rows.
    tokenizer.mask_token = tokenizer.convert_ids_to_tokens(mask_id)  # saved with the run, so exports carry it
    text = packed_text(data, tokenizer, model.vocab_size)
    names = text.source_names
    loss_fn = make_mntp_loss(
        mask_id=mask_id,
        ratio=mntp.mask_ratio,
        vocab_size=model.vocab_size,
        strategy=mntp.strategy,
        special_ids=text.special_ids,
        capacity_factor=mntp.capacity_factor,
        chunk_size=mntp.chunk_size,
        sparse=mntp.sparse,
        num_sources=len(names),
    )
    slots = capacity(data.seq_len, mntp.mask_ratio, mntp.capacity_factor) if mntp.sparse else None

    def report(means: Mapping[str, float]) -> dict[str, float]:
        out = logged_metrics(means, num_sources=len(names))
        for k, name in enumerate(names):  # per-source keys by the mixture's names
            out[f"loss/{name}"] = out.pop(f"loss/source_{k}")
            out[f"tokens/{name}"] = out.pop(f"tokens/source_{k}")
        return out

    evaluate = _held_out_evaluation(config, tokenizer, mask_id)
    return Objective(
        rows=text.rows,
        grad_fn=token_sum_grads(loss_fn, grad_accum=config.train.grad_accum_steps),
        flops_per_step=mntp_flops_per_step(model, data.seq_len, data.global_batch_size, slots),
        tokens_per_step=data.global_batch_size * data.seq_len,
        report=report,
        tokenizer=tokenizer,
        evaluate=evaluate,
        eval_every=int(mntp.get("eval_every", 0)) if evaluate else 0,
        key_metric="masked_accuracy",
    )


def _held_out_evaluation(config: ConfigDict, tokenizer, mask_id: int):
    """`mntp.eval_data` ("NAME:PATH;…"): held-out loss and masked accuracy per set (`evals.lm.evaluate_domains`),
    logged as `eval/loss/NAME` every `mntp.eval_every` steps and at the last one; None without held-out sets."""
    from bidirlm_jax.evals.lm import evaluate_domains, read_domains

    mntp = config.mntp
    spec = mntp.get("eval_data", "")
    if not spec:
        return None
    if int(mntp.get("eval_every", 0)) < 0:
        raise ConfigError(f"mntp.eval_every must be 0 (the last step only) or positive, got {mntp.eval_every}")
    domains = read_domains(spec, max_texts=int(mntp.get("eval_texts", 256)), text_field=config.data.text_field)
    return functools.partial(
        evaluate_domains,
        tokenizer=tokenizer,
        domains=domains,
        mask_ratio=mntp.mask_ratio,
        mask_token=mask_id,
        max_length=config.data.seq_len,
        seed=config.data.seed,
    )
