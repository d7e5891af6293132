"""The MNTP objective: masked next-token prediction (BidirLM, after LLM2Vec), trained with the loss of
`losses.mntp` (the shift, the segment rule and the sparse head are defined there).

`build` assembles the objective of a run: the tokenizer (the checkpoint's, `data.tokenizer`, or for the
built-in `stdlib` text one trained on it), the packed corpus or weighted mixture (`data.packing`,
`data.mixture`), the mask id (`mntp.mask_token`) and the loss.

Metric contract (see `base.token_sum_grads` for the engine's sums-then-divide convention): the token count is the
number of scored masked targets, so the engine's `loss` is the mean over masked tokens across
micro-batches and devices. `logged_metrics` turns the engine's token means of the loss's sums back into
the values worth logging. Held-out sets are an evaluation (`config.evals`, kind `mntp`: `evals.registry`), not
part of the objective.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from ml_collections import ConfigDict

from bidirlm_jax.io.tokenizer import resolve_mask_token
from bidirlm_jax.losses.mntp import capacity, make_mntp_loss
from bidirlm_jax.models.config import ModelConfig
from bidirlm_jax.models.runtime import Runtime
from bidirlm_jax.train.config import run_settings
from bidirlm_jax.train.metrics import training_flops_per_token
from bidirlm_jax.train.objectives.base import Objective, run_tokenizer, token_sum_grads
from bidirlm_jax.train.objectives.text import packed_text


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


def mntp_flops_per_step(
    model: ModelConfig, seq_len: int, rows: int, head_slots: int | None, *, runtime: Runtime
) -> float:
    """Training FLOPs of a step: the body on every token, the LM head only on the slots the sparse head
    runs (every position on the dense path)."""
    head = 6.0 * model.hidden_size * model.vocab_size  # forward + backward of one position's logits
    body = training_flops_per_token(model, seq_len, runtime=runtime) - head
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

    return Objective(
        rows=text.rows,
        grad_fn=token_sum_grads(loss_fn, grad_accum=config.train.grad_accum_steps),
        flops_per_step=mntp_flops_per_step(
            model, data.seq_len, data.global_batch_size, slots, runtime=run_settings(config.model)
        ),
        tokens_per_step=data.global_batch_size * data.seq_len,
        report=report,
        tokenizer=tokenizer,
        key_metric="masked_accuracy",
    )
