"""Texts -> one L2-normalised embedding each, fast: packed rows, length buckets and a cached `jit`.

Texts are tokenised once. By default several share each row (`data.batching.packed_batches`: segment ids and
per-text positions, so each text is computed as if alone and no FLOP goes to padding); with `pack=False`
they are sorted by length and cut into batches of a fixed number of rows, each padded to the smallest bucket
length (`data.batching.bucket_lengths`) that holds its longest text. Either way `jit` compiles a handful of
shapes however many batches there are, and a short batch is filled with real tokens (never an all-padding
row, whose fully masked attention is undefined), dropped after.
Queries of asymmetric tasks carry BidirLM's instruction template; documents never do."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from bidirlm_jax.data.batching import bucket_lengths, packed_batches, pad_batch, pad_id, tokenize
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models.config import POOLING_MODES
from bidirlm_jax.models.encoder import pooled_embeddings
from bidirlm_jax.models.transformer import Transformer

log = logging.getLogger(__name__)

_PROGRESS_MIN_BATCHES = 8  # a bar for inputs that take more than a few batches


def query_prompt(instruction: str) -> str:
    """The prefix BidirLM puts before a query (training and evaluation alike)."""
    return f"Instruct: {instruction}\nQuery: "


@dataclass(frozen=True)
class EncodeResult:
    """`encode`'s embeddings plus how many texts were cut to `max_length` tokens (the CLI reports it)."""

    embeddings: np.ndarray  # [N, d] float32, in input order
    num_truncated: int


def encode(
    model: Transformer,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    instruction: str | None = None,
    pooling: str = "mean",
    normalize: bool = True,
    batch_size: int = 32,
    max_length: int = 512,
    progress: bool | None = None,
    pack: bool = True,
) -> np.ndarray:
    """Embed `texts` with `model` (its attention mode as loaded) -> float32 numpy `[len(texts), d]`, input order.

    `tokenizer` is a transformers tokenizer (special tokens added as it is configured to). With `instruction`,
    every text becomes `Instruct: {instruction}\\nQuery: {text}`, and `pooling="mean"` averages the instruction's
    tokens too, as in training. Texts longer than `max_length` tokens are truncated, with a logged warning;
    `progress=None` shows a bar when there are many batches. `pack=False` pads one text per row instead of
    packing several per row (equal embeddings, more FLOPs).
    """
    return encode_texts(
        model,
        tokenizer,
        texts,
        instruction=instruction,
        pooling=pooling,
        normalize=normalize,
        batch_size=batch_size,
        max_length=max_length,
        progress=progress,
        pack=pack,
    ).embeddings


def encode_texts(
    model: Transformer,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    instruction: str | None = None,
    pooling: str = "mean",
    normalize: bool = True,
    batch_size: int = 32,
    max_length: int = 512,
    progress: bool | None = None,
    pack: bool = True,
) -> EncodeResult:
    """`encode`, also returning the number of truncated texts."""
    texts = _check_args(texts, pooling, batch_size, max_length)
    if instruction is not None:
        texts = [query_prompt(instruction) + t for t in texts]
    out = np.zeros((len(texts), model.config.hidden_size), np.float32)
    if not texts:
        return EncodeResult(out, 0)
    ids, num_truncated = tokenize(tokenizer, texts, max_length)
    if num_truncated:
        log.warning("%d of %d texts were longer than %d tokens and were truncated", num_truncated, len(ids), max_length)
    graphdef, state = nnx.split(model)
    run = functools.partial(_embed, graphdef=graphdef, pooling=pooling, normalize=normalize)
    batches = _batches(ids, batch_size, bucket_lengths(max_length), pad_id(tokenizer), pack)
    show = progress if progress is not None else len(batches) >= _PROGRESS_MIN_BATCHES
    with tqdm(total=len(ids), desc="encoding", unit="text", disable=not show) as bar:
        pending = None
        for index, inputs, num_texts in batches:
            current = (index, run(state, inputs, num_texts=num_texts))  # dispatched asynchronously
            if pending is not None:
                _collect(out, *pending, bar)  # fetch the previous batch while this one runs
            pending = current
        _collect(out, *pending, bar)
    return EncodeResult(out, num_truncated)


def _batches(ids: list[list[int]], batch_size: int, buckets: tuple[int, ...], pad: int, pack: bool):
    """(text indices, model inputs, texts to pool into or None for one per row) of every batch."""
    rows = min(batch_size, 1 << (len(ids) - 1).bit_length())  # a single query does not pay for 32 rows
    if pack:
        return [(b.texts, b.inputs, b.num_texts) for b in packed_batches(ids, rows=rows, buckets=buckets, pad=pad)]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out = []
    for lo in range(0, len(order), rows):
        index = order[lo : lo + rows]
        batch_ids, mask = pad_batch([ids[i] for i in index], rows, buckets, pad)
        out.append((index, {"input_ids": batch_ids, "attention_mask": mask}, None))
    return out


def _check_args(texts: Sequence[str], pooling: str, batch_size: int, max_length: int) -> list[str]:
    if isinstance(texts, str):
        raise ConfigError("encode takes a list of texts, not one string; wrap it: [text]")
    texts = list(texts)
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise ConfigError(f"text {bad} is a {type(texts[bad]).__name__}, not a string; pass strings only")
    if pooling not in POOLING_MODES:
        raise ConfigError(f"pooling {pooling!r} is not one of {POOLING_MODES}")
    if batch_size < 1 or max_length < 1:
        raise ConfigError(f"batch_size ({batch_size}) and max_length ({max_length}) must be positive")
    return texts


def _collect(out: np.ndarray, index: list[int], embeddings: jax.Array, bar: tqdm) -> None:
    out[index] = np.asarray(embeddings)[: len(index)]
    bar.update(len(index))


@functools.partial(jax.jit, static_argnames=("graphdef", "pooling", "normalize", "num_texts"))
def _embed(
    state: nnx.State,
    inputs: dict[str, jax.Array],
    *,
    graphdef: nnx.GraphDef,
    pooling: str,
    normalize: bool,
    num_texts: int | None,
) -> jax.Array:
    """One compiled function per (model graph, batch shape, pooling, normalize, texts): jit's own cache."""
    embeddings = pooled_embeddings(nnx.merge(graphdef, state), inputs, pooling, num_texts=num_texts)
    if num_texts is None:  # a text of no tokens embeds as zeros (packed: `pool_segments` gives them)
        embeddings = jnp.where(inputs["attention_mask"].any(axis=1, keepdims=True), embeddings, 0.0)
    if normalize:  # as torch.nn.functional.normalize (sentence-transformers' Normalize)
        embeddings = embeddings / jnp.maximum(jnp.linalg.norm(embeddings, axis=-1, keepdims=True), 1e-12)
    return embeddings
