"""The contrastive objective: cosine InfoNCE over in-batch and hard negatives (`losses.infonce`), with its
gradient formed by GradCache (`train.gradcache`) — token-sum accumulation over micro-batches would be
wrong here, since every query's candidates span the whole batch.

Data (`data.pairs`): `data.path` names `.jsonl`/`.parquet` files or directories (one dataset per file, or
a `dataset` field) or `hf:NAME`; `data.source="stdlib"` mines pairs from the standard library's
docstrings (offline `tiny` runs). Every batch comes from one dataset; `contrastive.instructions` (a JSON
file `{dataset: {"instruction": ..., "symmetric": bool}}`) prefixes queries (and, for symmetric tasks,
documents) with `Instruct: ...\\nQuery: `.

Media (`model.towers`: a Qwen3-VL / Qwen3-ASR checkpoint, or the tiny-qwen3-vl / -asr presets): pair sides
may be images or clips (`data.pairs`); `data.source="sample_images"` (scikit-image's photographs ↔ captions)
and `"spoken"` (espeak-ng sentences ↔ transcripts) are the offline ones, `"omni_mix"` both beside the
standard library's text pairs (an Omni model: BidirLM-Omni's text/image/audio mixture, `data.weights`).
Media datasets take 0 hard negatives (`contrastive.num_negatives` counts for the text ones). Every side is rendered as the model
reads it and collated one item per row at fixed shapes (`contrastive.max_pixels`, `contrastive.max_seconds`),
so GradCache chunks rows unpacked and its second pass recomputes the tower; the towers stay frozen (no
optimizer state) unless `contrastive.train_towers`.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Mapping
from pathlib import Path

import grain
import numpy as np
from ml_collections import ConfigDict

from bidirlm_jax.data.pairs import Instruction, PairBatches, PairDataset, read_pairs, with_instruction
from bidirlm_jax.data.stdlib_text import stdlib_pairs
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.run import PROMPTS_FILE
from bidirlm_jax.models.config import POOLING_MODES, ModelConfig
from bidirlm_jax.paths import user_path
from bidirlm_jax.train.gradcache import contrastive_loss_and_grads
from bidirlm_jax.train.objectives.base import Objective, check_data_path, run_tokenizer
from bidirlm_jax.train.objectives.media import processor_files, run_processor

SOURCES = ("pairs", "stdlib", "sample_images", "spoken", "omni_mix")
GATHER = ("global", "local")


class _Rows:
    """Global row `r` of the endless pair stream: row `r mod B` of batch `r // B` (a batch is tokenised
    once and kept while its rows are read)."""

    def __init__(self, batches: PairBatches):
        self._batches, self._size = batches, batches.batch_size
        self._batch = functools.lru_cache(maxsize=4)(batches.__getitem__)

    def __len__(self) -> int:
        return sys.maxsize  # endless: later epochs reshuffle (`PairBatches`)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        batch, row = divmod(int(index), self._size)
        return {k: v[row] for k, v in self._batch(batch).items()}


def _instructions(path: str, names: list[str]) -> dict[str, Instruction]:
    if not path:
        return {}
    try:
        table = json.loads(user_path(path).read_text())
        return {k: Instruction(v["instruction"], bool(v.get("symmetric", False))) for k, v in table.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(
            f"contrastive.instructions={path}: expected a JSON object {{dataset: {{'instruction': str, "
            f"'symmetric': bool}}}} for datasets among {names} ({e})"
        ) from None


def _weights(spec: str) -> dict[str, float] | None:
    """`"name:weight;name:weight"` (`data.weights`) → {name: weight}; empty = in proportion to size."""
    if not spec:
        return None
    try:
        return {n.strip(): float(w) for n, w in (part.split(":") for part in spec.split(";") if part.strip())}
    except ValueError:
        raise ConfigError(f"data.weights {spec!r} is not 'NAME:WEIGHT;NAME:WEIGHT'") from None


def build(config: ConfigDict, model: ModelConfig, *, workdir: Path) -> Objective:
    """The contrastive objective of a run, every input checked before anything is computed or written."""
    data, con = config.data, config.contrastive
    if data.source not in SOURCES:
        raise ConfigError(f"data.source={data.source!r} is not one of {SOURCES} for objective contrastive")
    if con.pooling not in POOLING_MODES or con.gather not in GATHER:
        raise ConfigError(f"contrastive.pooling must be one of {POOLING_MODES} and contrastive.gather one of {GATHER}")
    accum, limit = config.train.grad_accum_steps, config.train.max_rows_per_device
    if accum != 1:  # `preflight.plan_batch` raises grad_accum_steps to honour max_rows_per_device: name what was set
        setting = f"max_rows_per_device={limit} (set it to 0)" if limit else f"grad_accum_steps={accum} (keep it 1)"
        raise ConfigError(
            f"train.{setting} splits the batch into {accum} micro-batches, which would shrink contrastive "
            "training's in-batch negatives; bound memory with contrastive.chunk_size (GradCache) instead"
        )
    if con.temperature <= 0 or con.chunk_size < 0:
        raise ConfigError("contrastive.temperature must be positive and contrastive.chunk_size >= 0 (0 = no GradCache)")
    text = getattr(model, "text", model)  # a model with towers: its text stack
    tokenizer = run_tokenizer(config, model, workdir)
    processor = run_processor(config, con, model, tokenizer) if text is not model else None
    instructions: dict[str, Instruction] = {}
    if data.source == "stdlib":
        datasets, instructions = stdlib_pairs(num_negatives=con.num_negatives)
    elif data.source in MEDIA_SOURCES:
        datasets = [MEDIA_SOURCES[data.source](data.seed)]
    elif data.source == "omni_mix":  # the Omni mixture in miniature: text pairs, photographs, speech
        datasets, instructions = stdlib_pairs(num_negatives=con.num_negatives)
        datasets += [make(data.seed) for make in MEDIA_SOURCES.values()]
    else:
        check_data_path(data)
        datasets = read_pairs([p for p in data.path.split(",") if p])
        instructions = _instructions(con.instructions, [d.name for d in datasets])
    batches = PairBatches(
        datasets,
        tokenizer,
        batch_size=data.global_batch_size,
        num_negatives={ds.name: 0 if ds.media else con.num_negatives for ds in datasets},  # media: none (App. E)
        seed=data.seed,
        weights=_weights(data.weights),
        instructions=instructions,
        max_length=data.seq_len,
        processor=processor,
    )
    if con.get("mask_duplicates") and any(isinstance(p, dict) for ds in datasets for p in ds.positives):
        raise ConfigError(
            "contrastive.mask_duplicates compares documents by their token ids, and image or audio documents of one "
            "size share them; turn it off for datasets whose positives are media"
        )
    chunk = con.chunk_size or None
    settings = dict(
        chunk_size=chunk,
        temperature=con.temperature,
        pooling=con.pooling,
        gather=con.gather,
        mask_duplicates=bool(con.get("mask_duplicates", False)),  # configs written before the option: off
        # configs written before the option: packed (equal results); media rows are never packed
        pack=bool(con.get("pack", True)) and processor is None,
    )

    def grad_fn(graphdef, params, batch, rng):
        loss, grads, metrics = contrastive_loss_and_grads(graphdef, params, batch, rng, **settings)
        metrics = dict(metrics)
        return loss, grads, metrics.pop("tokens"), metrics

    b, length, k = data.global_batch_size, data.seq_len, con.num_negatives
    return Objective(
        rows=grain.MapDataset.source(_Rows(batches)),
        grad_fn=grad_fn,
        flops_per_step=contrastive_flops_per_step(
            text, batch_size=b, query_len=length, doc_len=length, num_negatives=k, chunked=chunk is not None
        ),
        tokens_per_step=b * (2 + k) * length,
        tokenizer=tokenizer,
        key_metric="in_batch_accuracy",
        run_files={
            PROMPTS_FILE: json.dumps({"prompts": trained_prompts(instructions)}, indent=2) + "\n",
            **processor_files(config, processor),
        },
    )


def _sample_images(seed: int) -> PairDataset:
    from bidirlm_jax.data.media.samples import sample_image_pairs

    return _dataset("sample_images", "scikit-image sample photographs", sample_image_pairs(seed=seed))


def _spoken(seed: int) -> PairDataset:
    from bidirlm_jax.data.media.speech import spoken_pairs

    return _dataset("spoken", "espeak-ng sentences", spoken_pairs(seed=seed))


MEDIA_SOURCES = {"sample_images": _sample_images, "spoken": _spoken}


def _dataset(name: str, source: str, pairs: list) -> PairDataset:
    ds = PairDataset(name=name, sources=[source])
    for i, (query, positive) in enumerate(pairs):
        ds.queries.append(query)
        ds.positives.append(positive)
        ds.negatives.append([])
        ds.where.append(f"{name}: pair {i}")
    return ds


def trained_prompts(instructions: Mapping[str, Instruction]) -> dict[str, str]:
    """The query prefixes the run trained with, by dataset name, for the export's sentence-transformers prompts;
    `query` too when every asymmetric dataset had the same instruction (the one a retrieval user wants)."""
    prompts = {name: with_instruction("", i.text) for name, i in sorted(instructions.items())}
    asymmetric = {with_instruction("", i.text) for i in instructions.values() if not i.symmetric}
    if len(asymmetric) == 1 and "query" not in prompts:
        prompts["query"] = asymmetric.pop()
    return prompts


def contrastive_flops_per_step(
    config: ModelConfig, *, batch_size: int, query_len: int, doc_len: int, num_negatives: int, chunked: bool
) -> float:
    """Model FLOPs of one step over the padded batch shapes: every text's encoder forward (no LM head) with
    full T² attention, times 3 for forward + backward, or 4 with GradCache (its second forward per chunk)."""
    d, hd = config.hidden_size, config.head_dim
    matmuls = config.num_layers * (
        d * hd * (2 * config.num_heads + 2 * config.num_kv_heads) + 3 * d * config.intermediate_size
    )

    def forward(length: int) -> float:
        attention = config.num_layers * 4 * config.num_heads * hd * length  # scores and values, per token
        return length * (2 * matmuls + attention)

    texts = batch_size * forward(query_len) + batch_size * (1 + num_negatives) * forward(doc_len)
    return (4.0 if chunked else 3.0) * texts
