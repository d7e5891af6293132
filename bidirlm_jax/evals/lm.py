"""MNTP on held-out text: masked-token accuracy and loss, the numbers that say whether adaptation worked.

Scored with training's own loss (`losses.mntp`: the state at j predicts the masked token at j + 1), with
BidirLM's masking (each eligible token replaced by the mask id with probability `mask_ratio`). Masks are
drawn per text from `(seed, text index)`, so the score depends on neither batch size nor order. Special
tokens, padding and each text's first token (nothing precedes it) are never masked. Texts are sorted by
length and padded to `encode`'s bucket lengths; the LM head runs on the masked positions only, in vocabulary
chunks, so a 262k-word head never materialises full logits.

Texts longer than `max_length` tokens are cut to it (counted in `num_truncated`, and logged).

`evaluate_domains` scores several held-out sets at once (`{"loss/NAME", "masked_accuracy/NAME",
"truncated_texts/NAME"}`), the measure of forgetting: MNTP runs with
`evals.held_out.data="english:PATH;code:PATH"` (kind `mntp`, `evals.registry`) log it as `eval/loss/NAME` every
`evals.held_out.every` steps.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from bidirlm_jax.data.batching import bucket_lengths, pad_batch, pad_id, tokenize
from bidirlm_jax.data.mntp import validate
from bidirlm_jax.data.sources import iter_documents
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.tokenizer import resolve_mask_token
from bidirlm_jax.losses.mntp import mntp_loss_from_mask
from bidirlm_jax.models.transformer import Transformer

log = logging.getLogger(__name__)


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
    ids, num_truncated = tokenize(tokenizer, list(texts), max_length)
    if num_truncated:
        log.warning(
            "MNTP evaluation: %d of %d texts were longer than %d tokens and were truncated",
            num_truncated,
            len(ids),
            max_length,
        )
    specials = np.array(sorted(set(tokenizer.all_special_ids)), np.int64)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    pad = pad_id(tokenizer)
    loss_sum = correct = count = 0.0
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch_ids, attention = pad_batch([ids[i] for i in index], batch_size, bucket_lengths(max_length), pad)
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
        "num_truncated": num_truncated,
    }


def parse_domains(spec: str) -> list[tuple[str, str]]:
    """`"NAME:PATH;NAME:PATH"` (`evals.held_out.data`) → [(name, path)]; a path may hold `:` (`hf:NAME`)."""
    domains = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, sep, path = part.partition(":")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(
                f"held-out set {part!r} is not NAME:PATH (e.g. 'english:/data/en.txt;code:/data/code.jsonl')"
            )
        domains.append((name.strip(), path.strip()))
    names = [n for n, _ in domains]
    if len(set(names)) != len(names):
        raise ConfigError(f"held-out set names {names} must be unique")
    return domains


def read_domains(spec: str, *, max_texts: int = 256, text_field: str = "text") -> dict[str, list[str]]:
    """The first `max_texts` documents of each held-out set `spec` names (`parse_domains`), in file order."""
    if max_texts < 1:
        raise ConfigError(f"max_texts must be positive, got {max_texts}")
    out = {}
    for name, path in parse_domains(spec):
        texts = []
        for text in iter_documents(path, text_field=text_field):
            texts.append(text)
            if len(texts) == max_texts:
                break
        if not texts:
            raise ConfigError(f"held-out set {name!r} ({path}) holds no documents")
        out[name] = texts
    return out


def evaluate_domains(
    model: Transformer, tokenizer: Any, domains: Mapping[str, Sequence[str]], **kwargs: Any
) -> dict[str, float]:
    """`evaluate_mntp` on each held-out set: `{"loss/NAME": …, "masked_accuracy/NAME": …,
    "truncated_texts/NAME": …}` (same `kwargs`)."""
    out = {}
    for name, texts in domains.items():
        scores = evaluate_mntp(model, tokenizer, texts, **kwargs)
        out[f"loss/{name}"] = scores["loss"]
        out[f"masked_accuracy/{name}"] = scores["masked_accuracy"]
        out[f"truncated_texts/{name}"] = scores["num_truncated"]
    return out


@nnx.jit(static_argnames="slots")
def _score(model, ids, attention, corrupted, masked, slots):
    batch = {"input_ids": ids, "attention_mask": attention}
    return mntp_loss_from_mask(model, batch, corrupted, jnp.asarray(masked), slots=slots)
