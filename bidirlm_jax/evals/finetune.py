"""Validation scores of a fine-tuned encoder with a task head (`models.heads.EncoderWithHead`) on a labeled
split: the numbers the paper reports per task (`evals.metrics`), plus the task's loss on the split. The
run's `evals.validation` entry (kind `finetune`, `evals.registry`) runs this every `evals.validation.every` steps."""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from bidirlm_jax.data.batching import bucket_for, bucket_lengths, packed_batches, row_floor
from bidirlm_jax.data.labeled import LabeledSplit, LabelMap
from bidirlm_jax.data.labeled_media import MediaEncoded, encode_labeled
from bidirlm_jax.data.labeled_rows import Encoded
from bidirlm_jax.data.media.items import MediaProcessor
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.evals.metrics import classification_metrics, regression_metrics, token_classification_metrics
from bidirlm_jax.io.tokenizer import pad_id


@functools.partial(jax.jit, static_argnums=0, static_argnames="num_texts")
def _logits(graphdef: nnx.GraphDef, params: nnx.State, inputs: dict, num_texts: int | None = None) -> jax.Array:
    return nnx.merge(graphdef, params)(**inputs, num_texts=num_texts).logits


def _predict_media(graphdef: nnx.GraphDef, params: nnx.State, encoded: MediaEncoded, batch_size: int) -> list:
    """Media rows in order, `batch_size` a batch at the collate's bucketed shapes (one item per row)."""
    out = []
    for lo in range(0, len(encoded), batch_size):
        picked = range(lo, min(lo + batch_size, len(encoded)))
        logits = jax.device_get(_logits(graphdef, params, encoded.batch(picked, batch_size)))
        out += list(np.asarray(logits, np.float32)[: len(picked)])
    return out


def predict(
    model: nnx.Module, encoded: Encoded | MediaEncoded, *, pad: int, batch_size: int = 32, pack: bool = True
) -> list[np.ndarray]:
    """The model's logits for every example of `encoded`, in order (each cut to its own length for token
    tasks). Examples are packed several per row (`data.batching.packed_batches`, rows of at least `row_floor`),
    or with `pack=False` sorted by length into fixed-size batches padded to a few bucket lengths (a last short
    batch filled with copies of a real row): either way the forward compiles a handful of shapes. Media
    examples (a model with towers) are never packed: one per row, in order, at the media collate's buckets."""
    n = len(encoded)
    if n == 0:
        raise ConfigError("nothing to evaluate: the split holds no examples")
    if batch_size <= 0:
        raise ConfigError(f"evaluation batch size {batch_size} must be positive")
    if isinstance(encoded, MediaEncoded):
        return _predict_media(*nnx.split(model), encoded, batch_size)
    lengths = encoded.lengths
    graphdef, params = nnx.split(model)
    out: list[np.ndarray | None] = [None] * n
    if pack:
        token = encoded.task == "token_classification"
        seqs = [encoded.ids[encoded.offsets[i] : encoded.offsets[i + 1]] for i in range(n)]
        floor = row_floor(seqs, batch_size)  # rows may be longer than the longest example: several share one
        buckets = bucket_lengths(max(int(lengths.max()), floor, 1))
        for batch in packed_batches(seqs, rows=batch_size, buckets=buckets, pad=pad, min_length=floor):
            logits = np.asarray(
                jax.device_get(_logits(graphdef, params, batch.inputs, num_texts=batch.num_texts)), np.float32
            )
            for k, (i, (row, start)) in enumerate(zip(batch.texts, batch.places)):
                out[i] = logits[row, start : start + lengths[i]] if token else logits[k]
        return out  # type: ignore[return-value]
    order = np.argsort(lengths, kind="stable")
    buckets = bucket_lengths(max(int(lengths.max()), 1))
    for lo in range(0, n, batch_size):
        picked = order[lo : lo + batch_size]
        width = bucket_for(int(lengths[picked].max()), buckets)
        rows = [encoded.row(int(i), width, pad) for i in picked]
        rows += [rows[-1]] * (batch_size - len(rows))
        inputs = {key: np.stack([r[key] for r in rows]) for key in ("input_ids", "attention_mask")}
        logits = np.asarray(jax.device_get(_logits(graphdef, params, inputs)), np.float32)
        for k, i in enumerate(picked):
            out[int(i)] = logits[k, : lengths[i]] if encoded.task == "token_classification" else logits[k]
    return out  # type: ignore[return-value]


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]


def evaluate_encoded(
    model: nnx.Module, encoded: Encoded | MediaEncoded, label_map: LabelMap, *, pad: int, batch_size: int = 32
) -> dict[str, float]:
    """Validation metrics of `model` on an encoded split (see `evaluate`)."""
    head = getattr(model, "head_config", None)
    if head is None or head.task != label_map.task:
        raise ConfigError(f"the model has no {label_map.task} head (got {head}); build it with models.heads")
    if head.num_labels != label_map.num_labels:
        raise ConfigError(
            f"the model's head has {head.num_labels} outputs but the label map has {label_map.num_labels} labels "
            f"{list(label_map.names)}; evaluate with the label map the model was trained with"
        )
    logits = predict(model, encoded, pad=pad, batch_size=batch_size)
    out: dict[str, float] = {}
    if encoded.task == "regression":
        predictions = np.asarray(logits, np.float64)
        out.update(regression_metrics(encoded.labels, predictions))
        out["loss"] = float(np.mean((predictions - encoded.labels) ** 2))
    elif encoded.task == "classification":
        stacked = np.stack(logits)
        out.update(classification_metrics(encoded.labels, stacked.argmax(axis=-1)))
        out["loss"] = float(np.mean(_cross_entropy(stacked, encoded.labels)))
    else:
        names = np.asarray(label_map.names, dtype=object)
        true, pred, losses = [], [], []
        for row_logits, tags, starts in zip(logits, encoded.word_labels, encoded.word_starts):
            kept = starts >= 0
            if not kept.any():
                continue
            at = row_logits[starts[kept]]
            true.append(list(names[tags[kept]]))
            pred.append(list(names[at.argmax(axis=-1)]))
            losses.append(_cross_entropy(at, tags[kept]))
        if not true:
            raise ConfigError("no word of the split kept a token within data.seq_len; raise data.seq_len")
        out.update(token_classification_metrics(true, pred))
        out["loss"] = float(np.mean(np.concatenate(losses)))
        out["dropped_words"] = float(encoded.num_dropped_words)
    out["examples"] = float(len(encoded))
    out["truncated"] = float(encoded.num_truncated)
    return out


def evaluate(
    model: nnx.Module,
    tokenizer,
    split: LabeledSplit,
    *,
    label_map: LabelMap,
    max_length: int = 512,
    batch_size: int = 32,
    word_separator: str = " ",
    processor: MediaProcessor | None = None,
) -> dict[str, float]:
    """Metrics of a fine-tuned `model` (`EncoderWithHead`) on a labeled split: tokenise it as training
    did (with a `processor`, for a model with towers: render its items), predict, score (`evals.metrics`).
    Keys: classification `accuracy`, `macro_f1`; regression `pearson`, `spearman`, `mse`; token
    classification `precision`, `recall`, `f1` (entities), `accuracy` (words), `dropped_words`; always `loss`
    (the training loss on this split), `examples`, `truncated`."""
    encoded = encode_labeled(
        split, tokenizer, label_map, max_length=max_length, word_separator=word_separator, processor=processor
    )
    return evaluate_encoded(model, encoded, label_map, pad=pad_id(tokenizer), batch_size=batch_size)
