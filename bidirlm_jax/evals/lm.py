"""MNTP on held-out text: masked-token accuracy and loss, the numbers that say whether adaptation worked.

Scored exactly as training scores (`train.objectives.mntp`: the state at j predicts the masked token at j + 1), with
BidirLM's masking (each eligible token replaced by the mask id with probability `mask_ratio`). Masks are
drawn per text from `(seed, text index)`, so the score depends on neither batch size nor order. Special
tokens, padding and each text's first token (nothing precedes it) are never masked. Texts are sorted by
length and padded to `encode`'s bucket lengths; the LM head runs on the masked positions only, in vocabulary
chunks, so a 262k-word head never materialises full logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from bidirlm_jax.data.mntp import validate
from bidirlm_jax.data.tokenizer import resolve_mask_token
from bidirlm_jax.embed.encode import bucket_lengths, pad_batch, tokenize
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models.transformer import Transformer
from bidirlm_jax.train.objectives.mntp import mntp_loss_from_mask


def evaluate_mntp(
    model: Transformer,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    mask_ratio: float = 0.3,
    mask_token: str | int = "auto",
    max_length: int = 512,
    batch_size: int = 16,
    seed: int = 0,
) -> dict[str, float]:
    """Mean masked-token accuracy and cross-entropy over every masked token of `texts` (the model's attention
    mode as loaded: bidirectional for an MNTP checkpoint)."""
    mask_id = resolve_mask_token(tokenizer, mask_token, family=model.config.family)
    validate(ratio=mask_ratio, mask_id=mask_id, vocab_size=model.config.vocab_size)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    ids, _ = tokenize(tokenizer, list(texts), max_length)
    specials = np.array(sorted(set(tokenizer.all_special_ids)), np.int64)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    loss_sum = correct = count = 0.0
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch_ids, attention = pad_batch([ids[i] for i in index], batch_size, bucket_lengths(max_length), 0)
        masked = np.zeros(batch_ids.shape, bool)
        for row, i in enumerate(index):  # filler rows (copies) stay unmasked: they score nothing
            maskable = (attention[row] > 0) & ~np.isin(batch_ids[row], specials)
            maskable[0] = False
            draw = np.random.default_rng([seed, i]).random(batch_ids.shape[1]) < mask_ratio
            masked[row] = maskable & draw
        corrupted = np.where(masked, mask_id, batch_ids)
        slots = min(batch_ids.shape[1] - 1, 1 << int(max(masked.sum(1).max(), 1) - 1).bit_length())
        batch_loss, batch_count, metrics = _score(model, batch_ids, attention, corrupted, masked, slots)
        loss_sum += float(batch_loss)
        count += float(batch_count)
        correct += float(metrics["masked_accuracy"])
    if count == 0:
        raise ConfigError("no token was masked: give longer texts or a larger mask_ratio")
    return {
        "masked_accuracy": correct / count,
        "loss": loss_sum / count,
        "masked_tokens": int(count),
        "num_texts": len(ids),
    }


@nnx.jit(static_argnames="slots")
def _score(model, ids, attention, corrupted, masked, slots):
    batch = {"input_ids": ids, "attention_mask": attention}
    return mntp_loss_from_mask(model, batch, corrupted, jnp.asarray(masked), slots=slots)
