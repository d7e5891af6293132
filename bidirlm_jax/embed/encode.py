"""Texts (and images, clips, or text with media) -> one L2-normalised embedding each, fast: packed rows,
length buckets and a cached `jit`.

Texts are tokenised once. By default several share each row (`data.batching.packed_batches`: segment ids and
per-text positions, so each text is computed as if alone and no FLOP goes to padding); with `pack=False`
they are sorted by length and cut into batches of a fixed number of rows, each padded to the smallest bucket
length (`data.batching.bucket_lengths`) that holds its longest text. Either way `jit` compiles a handful of
shapes however many batches there are, and a short batch is filled with real tokens (never an all-padding
row, whose fully masked attention is undefined), dropped after.
Queries of asymmetric tasks carry BidirLM's instruction template; documents never do.

A model with towers (Qwen3-VL, Qwen3-ASR, Omni) takes items: a string or `{"image", "audio", "text"}`
(`data.media.items`). Each is rendered in the chat template (the released Omni encoder's; the instruction
goes on string items only, never on media). Items with media are sorted by length and batched one item per
row (`data.media.collate`: buckets of tokens, patches and frames); rendered text-only items go through the
text stack packed, as a text model's texts do (equal results: no tower touches them). Mean pooling covers the
whole sequence, template and media tokens included, as the released encoder pools."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from bidirlm_jax.data.batching import bucket_lengths, packed_batches, pad_batch, pad_id, row_floor, tokenize
from bidirlm_jax.data.media.collate import collate
from bidirlm_jax.data.media.items import MediaProcessor, media_processor
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models.config import POOLING_MODES
from bidirlm_jax.models.encoder import embedding_size, pooled_embeddings
from bidirlm_jax.models.transformer import Transformer

log = logging.getLogger(__name__)

_PROGRESS_MIN_BATCHES = 8  # a bar for inputs that take more than a few batches
_RENDER_CUTS = ("text_truncated", "downscaled", "audio_truncated", "audio_dropped")  # RenderedItem's fields
_CUTS = (
    "texts were longer than {max_length} tokens and were truncated",
    "items held images larger than the pixel budget, scaled down to it",
    "items held clips longer than the maximum duration, cut to it",
    "items held clips whose last tower tokens the release's placeholder count drops (audio_placeholders='release')",
)


def query_prompt(instruction: str) -> str:
    """The prefix BidirLM puts before a query (training and evaluation alike)."""
    return f"Instruct: {instruction}\nQuery: "


@dataclass(frozen=True)
class EncodeResult:
    """`encode`'s embeddings plus how many texts were cut to `max_length` tokens (the CLI reports it)."""

    embeddings: np.ndarray  # [N, d] float32, in input order
    num_truncated: int
    num_downscaled: int = 0  # images scaled down to the pixel budget
    num_audio_truncated: int = 0  # clips cut to the maximum duration
    num_audio_dropped: int = 0  # clips whose last tokens the release's placeholder count leaves out


def encode(
    model: Transformer,
    tokenizer: Any,
    texts: Sequence[str | Mapping[str, Any]],
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
    packing several per row (equal embeddings, more FLOPs). For a model with towers, `texts` are items
    (strings or `{"image", "audio", "text"}`) and `tokenizer` may be a `MediaProcessor` (its template and
    pixel budget), else one is built from the model's config (see the module doc).
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
    texts: Sequence[str | Mapping[str, Any]],
    *,
    instruction: str | None = None,
    pooling: str = "mean",
    normalize: bool = True,
    batch_size: int = 32,
    max_length: int = 512,
    progress: bool | None = None,
    pack: bool = True,
    item_names: Sequence[str] | None = None,
) -> EncodeResult:
    """`encode`, also returning the number of truncated texts (and, for media, resized images and cut clips);
    `item_names` name the items in errors (`file:line`; default `item i`)."""
    media = hasattr(model, "batch_hidden_states")
    texts = _check_args(texts, pooling, batch_size, max_length, media=media)
    if instruction is not None:
        texts = [query_prompt(instruction) + t if isinstance(t, str) else t for t in texts]
    out = np.zeros((len(texts), embedding_size(model)), np.float32)
    if not texts:
        return EncodeResult(out, 0)
    runner = functools.partial(_runner, pooling=pooling, normalize=normalize)
    if media:
        processor = tokenizer if isinstance(tokenizer, MediaProcessor) else media_processor(model, tokenizer)
        names = item_names or [f"item {i}" for i in range(len(texts))]
        rendered = [processor.render(t, max_length, where=name) for t, name in zip(texts, names)]
        counts = [sum(getattr(r, f) > 0 for r in rendered) for f in _RENDER_CUTS]
        text_only = [pack and r.patches is None and r.features is None for r in rendered]
        plain = [i for i, t in enumerate(text_only) if t]
        with_media = [i for i, t in enumerate(text_only) if not t]
        buckets, pad = bucket_lengths(max_length), pad_id(processor.tokenizer)
        text_batches = _batches([rendered[i].ids for i in plain], batch_size, buckets, pad, pack) if plain else []
        run_text, run_media = runner(model.text), runner(model)
        batches = [([plain[j] for j in index], inputs, n, run_text) for index, inputs, n in text_batches]
        media_batches = _media_batches([rendered[i] for i in with_media], processor, batch_size, max_length)
        batches += [([with_media[j] for j in index], inputs, n, run_media) for index, inputs, n in media_batches]
    else:
        ids, num_truncated = tokenize(tokenizer, texts, max_length)
        counts = [num_truncated, 0, 0, 0]
        run = runner(model)
        batches = [(*b, run) for b in _batches(ids, batch_size, bucket_lengths(max_length), pad_id(tokenizer), pack)]
    for count, what in zip(counts, _CUTS):
        if count:
            log.warning("%d of %d %s", count, len(texts), what.format(max_length=max_length))
    show = progress if progress is not None else len(batches) >= _PROGRESS_MIN_BATCHES
    with tqdm(total=len(texts), desc="encoding", unit="item", disable=not show) as bar:
        pending = None
        for index, inputs, num_texts, run in batches:
            current = (index, run(inputs, num_texts=num_texts))  # dispatched asynchronously
            if pending is not None:
                _collect(out, *pending, bar)  # fetch the previous batch while this one runs
            pending = current
        _collect(out, *pending, bar)
    return EncodeResult(out, *counts)


def _runner(module: nnx.Module, *, pooling: str, normalize: bool):
    """`run(inputs, num_texts=None)` -> embeddings of one batch through `module` (a model, or a tower model's
    text stack), compiled once per batch shape."""
    graphdef, state = nnx.split(module)
    return functools.partial(_embed, state, graphdef=graphdef, pooling=pooling, normalize=normalize)


def _media_batches(rendered: list, processor: MediaProcessor, batch_size: int, max_length: int):
    """(item indices, row-aligned inputs, None) per batch: items sorted by length, one per row."""
    if not rendered:
        return []
    rows = min(batch_size, 1 << (len(rendered) - 1).bit_length())
    order = sorted(range(len(rendered)), key=lambda i: -len(rendered[i].ids))
    out = []
    for lo in range(0, len(order), rows):
        index = order[lo : lo + rows]
        inputs = collate([rendered[i] for i in index], processor, rows=rows, max_length=max_length)
        out.append((index, inputs, None))
    return out


def _batches(ids: list[list[int]], batch_size: int, buckets: tuple[int, ...], pad: int, pack: bool):
    """(text indices, model inputs, texts to pool into or None for one per row) of every batch."""
    rows = min(batch_size, 1 << (len(ids) - 1).bit_length())  # a single query does not pay for 32 rows
    if pack:
        floor = row_floor(ids, rows)
        return [
            (b.texts, b.inputs, b.num_texts)
            for b in packed_batches(ids, rows=rows, buckets=buckets, pad=pad, min_length=floor)
        ]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out = []
    for lo in range(0, len(order), rows):
        index = order[lo : lo + rows]
        batch_ids, mask = pad_batch([ids[i] for i in index], rows, buckets, pad)
        out.append((index, {"input_ids": batch_ids, "attention_mask": mask}, None))
    return out


def _check_args(texts: Sequence, pooling: str, batch_size: int, max_length: int, *, media: bool) -> list:
    if isinstance(texts, (str, Mapping)):
        raise ConfigError("encode takes a list of texts (or items), not one; wrap it: [text]")
    texts = list(texts)
    kinds = (str, Mapping) if media else str
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, kinds)), None)
    if bad is not None:
        if isinstance(texts[bad], Mapping):
            raise ConfigError(
                f"item {bad} holds media but the model has no vision or audio tower; load a Qwen3-VL, Qwen3-ASR "
                "or BidirLM-Omni checkpoint (with its towers) to embed images or audio"
            )
        expected = "a string or a {'image', 'audio', 'text'} mapping" if media else "a string"
        raise ConfigError(f"item {bad} is a {type(texts[bad]).__name__}, not {expected}")
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
