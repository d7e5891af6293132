"""Contrastive pairs: records, instructions, and batches that each come from a single dataset.

Records are `{"query": str, "positive": str, "negatives": [str, ...]}` lines of `.jsonl` files, rows of
`.parquet` files, or rows of a hub dataset (`hf:NAME[:CONFIG]`, online only). A query or positive may be a
media item instead, `{"image": PATH}` or `{"audio": PATH}` with an optional `"text"` (a path relative to
its file's directory; a parquet image cell `{"bytes", "path"}` works too); media datasets take 0 hard
negatives and need a model with the matching tower. A record's dataset is its
`dataset` field, else its file's stem (the hub name); records with the same name form one dataset, wherever
they come from. Records are held in memory.

Batches (BidirLM, appendix C): every batch is drawn from one dataset, so in-batch negatives share a task.
`PairBatches[i]` is a pure function of `(seed, i)`, so a run resumes by batch index (through grain):
- no `weights`: epochs; each epoch shuffles every dataset and the order of all their full batches, so
  datasets appear in proportion to their size and every record is used once per epoch (a dataset's last
  partial batch of an epoch is skipped, a different one each epoch);
- `weights` {dataset: weight}: each batch picks its dataset by weight and its records at random (no record
  twice within a batch, independently across batches).

Hard negatives: `num_negatives` K (one number, or one per dataset) takes each record's first K negatives;
a record with fewer is refused, naming its file and line (we do not invent negatives: lower K for that
dataset instead). K is constant within a dataset, so batches of different datasets may differ in shape
(one compilation per distinct K).

Instructions (BidirLM, appendix C): `Instruct: {instruction}\\nQuery: {text}` on queries only for asymmetric
tasks (retrieval, reranking), on queries, positives and negatives for symmetric ones (STS, pair
classification), from `{dataset: (instruction, symmetric)}`; documents of asymmetric tasks are never
prefixed, and datasets absent from the map get no prefix.

Batch contract (numpy, this process's rows of the global batch, right padding): `query_ids`, `query_mask`
int32 [B, Lq]; `positive_ids`, `positive_mask` int32 [B, Ld]; `negative_ids`, `negative_mask` int32
[B, K, Ld] (K may be 0); `dataset` int32 [B] (index into `PairBatches.names`); `truncated` int32 [B] (texts
of the row cut at their max length). Lq and Ld are fixed (`query_max_length`, `doc_max_length`, default
`max_length` 512) so that the jitted step compiles once per K.

With a `processor` (a model with towers: `data.media.items.MediaProcessor`), every side is rendered as the
model reads it (the chat template, media placeholders expanded) and collated row-aligned at fixed shapes
(`data.media.collate`): `{role}_input_ids`, `{role}_attention_mask`, `{role}_positions`, and the media keys
of the kinds that side of the dataset holds (`{role}_pixel_values`, …, `{role}_input_features`,
`{role}_audio_lengths`; none for a text dataset, so the towers never run over empty slots), negatives as
[B, K, ...].
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grain
import numpy as np

from bidirlm_jax.data.batching import pad_id, pad_rows
from bidirlm_jax.data.media.collate import collate
from bidirlm_jax.data.media.items import MediaProcessor
from bidirlm_jax.data.records import HUB_PREFIX, ROWS, expand, hub_dataset, hub_records, read_file
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.paths import user_path

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

EXTENSIONS = (".jsonl", ".parquet")
INSTRUCTION_TEMPLATE = "Instruct: {instruction}\nQuery: {text}"
_FIX = (
    'every record needs non-empty "query" and "positive" strings (or {"image"/"audio": PATH} objects) and '
    'optionally "negatives", a list of strings'
)
MEDIA = ("image", "audio")
Item = str | dict[str, Any]


@dataclass(frozen=True)
class Instruction:
    """A dataset's task instruction; `symmetric` tasks (STS, pair classification) prefix both sides."""

    text: str
    symmetric: bool = False


@dataclass
class PairDataset:
    """One dataset's records; `where[i]` is record i's origin (`file:line`) for error messages, `sources`
    the files (or hub names) its records came from."""

    name: str
    sources: list[str] = field(default_factory=list)
    queries: list[Item] = field(default_factory=list)
    positives: list[Item] = field(default_factory=list)
    negatives: list[list[str]] = field(default_factory=list)
    where: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.queries)

    @property
    def media(self) -> tuple[str, ...]:
        """The media kinds its records hold ("image", "audio"), in that order."""
        return media_kinds([*self.queries, *self.positives])


def media_kinds(items: Sequence[Item]) -> tuple[str, ...]:
    """The media kinds ("image", "audio") among `items`, in that order."""
    held = [i for i in items if isinstance(i, dict)]
    return tuple(m for m in MEDIA if any(m in i for i in held))


def with_instruction(text: str, instruction: str) -> str:
    return INSTRUCTION_TEMPLATE.format(instruction=instruction, text=text)


def read_pairs(paths: str | os.PathLike | Sequence[str | os.PathLike], *, split: str = "train") -> list[PairDataset]:
    """The datasets of `.jsonl` / `.parquet` files, directories of them, or `hf:NAME[:CONFIG]` (its `split`),
    sorted by name. Raises `ConfigError` naming the file and 1-based line of a malformed record."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    datasets: dict[str, PairDataset] = {}
    for path in paths:
        text = os.fspath(path)
        if text.startswith(HUB_PREFIX):
            spec = text[len(HUB_PREFIX) :]
            sources = [(text, spec.split(":")[0], hub_records(spec, split, hub_dataset(spec, split)))]
        else:
            sources = [(str(f), f.stem, read_file(f)) for f in _pair_files(user_path(text))]
        for source, default_name, records in sources:
            empty = True
            for where, record in records:
                empty = False
                _add(datasets, default_name, source, where, record)
            if empty:
                raise ConfigError(f"{source} holds no records (an empty dataset); {_FIX}")
    if not datasets:
        raise ConfigError("no contrastive data given; set data.path to .jsonl/.parquet files or hf:NAME")
    return [datasets[name] for name in sorted(datasets)]


def _pair_files(path: Path) -> list[Path]:
    if not path.is_dir() and not path.exists():
        raise ConfigError(f"pairs file {path} does not exist; give .jsonl or .parquet files (one dataset each)")
    return expand(path, EXTENSIONS, "files of pairs: " + " or ".join(EXTENSIONS))


def _add(datasets: dict[str, PairDataset], default_name: str, source: str, where: str, record: object) -> None:
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: a record must be an object, got {type(record).__name__}; {_FIX}")
    for contract in ROWS["pair"]:
        value = record.get(contract.key)
        if contract.key == "negatives":  # a list of texts, each non-empty
            if value and not (contract.accepts(value) and all(n.strip() for n in value)):
                raise ConfigError(f'{where}: "negatives" must be a list of non-empty strings; {_FIX}')
        elif contract.required and not (contract.accepts(value) and (isinstance(value, dict) or value.strip())):
            problem = "missing" if value is None else "empty" if isinstance(value, str) else f"not {contract.expected}"
            raise ConfigError(f'{where}: record field "{contract.key}" is {problem}; {_FIX}')
    negatives = record.get("negatives") or []
    name = str(record.get("dataset") or default_name)
    ds = datasets.setdefault(name, PairDataset(name))
    if source not in ds.sources:
        ds.sources.append(source)
    ds.queries.append(_item(record["query"], source, where))
    ds.positives.append(_item(record["positive"], source, where))
    ds.negatives.append(negatives)
    ds.where.append(where)


def _item(value: Item, source: str, where: str) -> Item:
    """A text as it is; a media item with its path made relative to the record's file, checked to exist."""
    if isinstance(value, str):
        return value
    item = dict(value)
    for kind in MEDIA:
        path = item.get(kind)
        if isinstance(path, str):
            if not source.startswith(HUB_PREFIX):
                path = str(Path(source).parent / path)
            if not Path(path).is_file():
                raise ConfigError(f"{where}: {kind} file not found: {path}")
            item[kind] = path
    return item


class PairBatches:
    """Random-access global batches (see the module docstring); `self[i]` is this process's share of
    batch i, tokenised. Every setting is checked here, before any training starts."""

    def __init__(
        self,
        datasets: Sequence[PairDataset],
        tokenizer: PreTrainedTokenizerBase,
        *,
        batch_size: int,
        num_negatives: int | Mapping[str, int] = 0,
        seed: int = 0,
        weights: Mapping[str, float] | None = None,
        instructions: Mapping[str, Instruction | tuple[str, bool]] | None = None,
        max_length: int = 512,
        query_max_length: int | None = None,
        doc_max_length: int | None = None,
        process_index: int = 0,
        process_count: int = 1,
        processor: MediaProcessor | None = None,
    ):
        self.datasets = list(datasets)
        self.names = [ds.name for ds in self.datasets]
        self.tokenizer = tokenizer
        self.batch_size, self.seed = batch_size, seed
        self.query_max_length = query_max_length or max_length
        self.doc_max_length = doc_max_length or max_length
        self._rows = slice(
            process_index * batch_size // process_count, (process_index + 1) * batch_size // process_count
        )
        if batch_size < 1 or batch_size % process_count:
            raise ConfigError(f"batch size {batch_size} must be positive and divide over {process_count} processes")
        if min(self.query_max_length, self.doc_max_length) < 1:
            raise ConfigError("max lengths must be positive")
        self.weights = self._check_weights(weights)
        self.instructions = self._check_instructions(instructions or {})
        self.num_negatives = self._check_negatives(num_negatives)
        self.processor = processor
        self._check_media()
        for ds, w in zip(self.datasets, self.weights if self.weights is not None else [1.0] * len(self.datasets)):
            if w > 0 and len(ds) < batch_size:
                raise ConfigError(
                    f"dataset {ds.name!r} ({', '.join(ds.sources)}) has {len(ds)} records, fewer than one batch "
                    f"of {batch_size}; every batch comes from one dataset: lower the batch size, or remove or merge "
                    "this dataset"
                )
        self._slots = [(d, k) for d, ds in enumerate(self.datasets) for k in range(len(ds) // batch_size)]
        self._epoch: tuple[int, np.ndarray, list[np.ndarray]] | None = None

    def _check_weights(self, weights: Mapping[str, float] | None) -> np.ndarray | None:
        if weights is None:
            return None
        unknown = set(weights) - set(self.names)
        if unknown:
            raise ConfigError(f"weights name unknown datasets {sorted(unknown)}; the datasets are {self.names}")
        w = np.array([float(weights.get(name, 0.0)) for name in self.names])
        if (w < 0).any() or w.sum() <= 0:
            raise ConfigError(f"dataset weights must be non-negative with a positive sum, got {dict(weights)}")
        return w / w.sum()

    def _check_instructions(self, instructions: Mapping[str, Instruction | tuple[str, bool]]) -> dict[str, Instruction]:
        unknown = set(instructions) - set(self.names)
        if unknown:
            raise ConfigError(f"instructions name unknown datasets {sorted(unknown)}; the datasets are {self.names}")
        return {k: v if isinstance(v, Instruction) else Instruction(*v) for k, v in instructions.items()}

    def _check_negatives(self, num_negatives: int | Mapping[str, int]) -> list[int]:
        if isinstance(num_negatives, Mapping):
            missing = set(self.names) - set(num_negatives)
            if missing:
                raise ConfigError(f"contrastive.num_negatives gives no count for datasets {sorted(missing)}")
            counts = [int(num_negatives[name]) for name in self.names]
        else:
            counts = [int(num_negatives)] * len(self.datasets)
        for ds, k in zip(self.datasets, counts):
            if k < 0:
                raise ConfigError(f"contrastive.num_negatives for {ds.name!r} must be >= 0, got {k}")
            for where, negatives in zip(ds.where, ds.negatives):
                if len(negatives) < k:
                    raise ConfigError(
                        f"{where}: record has {len(negatives)} hard negatives but contrastive.num_negatives for dataset "
                        f'{ds.name!r} is {k}; give every record at least {k} "negatives", or lower '
                        f"--config.contrastive.num_negatives"
                    )
        return counts

    def _check_media(self) -> None:
        towers = {"image": self.processor and self.processor.vision, "audio": self.processor and self.processor.audio}
        for ds, k in zip(self.datasets, self.num_negatives):
            missing = [m for m in ds.media if not towers[m]]
            if missing:
                raise ConfigError(
                    f"dataset {ds.name!r} ({', '.join(ds.sources)}) holds {' and '.join(missing)} but the model has no "
                    f"such tower; train a Qwen3-VL / Qwen3-ASR / Omni checkpoint with --config.model.towers=true"
                )
            if ds.media and k:
                raise ConfigError(
                    f"dataset {ds.name!r} holds media and takes 0 hard negatives, not {k}; set "
                    f"--config.contrastive.num_negatives=0 (or per dataset)"
                )
        # Each side of each dataset carries the media keys of the kinds it holds, and only those: a text
        # dataset's batches hold no image or clip slots for the towers to run over (fixed shapes per dataset).
        self._media = [{"query": media_kinds(ds.queries), "doc": media_kinds(ds.positives)} for ds in self.datasets]

    def __len__(self) -> int:
        """Batches per epoch (any index is valid: later epochs reshuffle)."""
        return len(self._slots) if self.weights is None else sum(map(len, self.datasets)) // self.batch_size

    def schedule(self, index: int) -> tuple[int, np.ndarray]:
        """(dataset number, record indices [batch_size]) of global batch `index`."""
        if self.weights is not None:
            rng = np.random.default_rng([self.seed, 1, index])
            d = int(rng.choice(len(self.datasets), p=self.weights))
            return d, np.sort(rng.choice(len(self.datasets[d]), self.batch_size, replace=False))
        epoch, position = divmod(index, len(self._slots))
        cached = self._epoch
        if cached is None or cached[0] != epoch:
            order = np.random.default_rng([self.seed, 0, epoch]).permutation(len(self._slots))
            perms = [
                np.random.default_rng([self.seed, 0, epoch, d + 1]).permutation(len(ds))
                for d, ds in enumerate(self.datasets)
            ]
            cached = self._epoch = (epoch, order, perms)
        d, k = self._slots[cached[1][position]]
        return d, cached[2][d][k * self.batch_size : (k + 1) * self.batch_size]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        d, records = self.schedule(int(index))
        ds, k = self.datasets[d], self.num_negatives[d]
        records = records[self._rows]
        instruction = self.instructions.get(ds.name)
        prefix = (lambda t: with_instruction(t, instruction.text)) if instruction else (lambda t: t)
        doc_prefix = prefix if instruction and instruction.symmetric else (lambda t: t)
        queries = [_text_only(prefix, ds.queries[r]) for r in records]
        docs = [_text_only(doc_prefix, t) for r in records for t in [ds.positives[r], *ds.negatives[r][:k]]]
        if self.processor is not None:
            return self._media_batch(ds, records, queries, docs, d, k)
        q_ids, q_mask, q_cut = self._tokenize(queries, self.query_max_length)
        d_ids, d_mask, d_cut = self._tokenize(docs, self.doc_max_length)
        b = len(records)
        d_ids, d_mask = d_ids.reshape(b, 1 + k, -1), d_mask.reshape(b, 1 + k, -1)
        return {
            "query_ids": q_ids,
            "query_mask": q_mask,
            "positive_ids": d_ids[:, 0],
            "positive_mask": d_mask[:, 0],
            "negative_ids": d_ids[:, 1:],
            "negative_mask": d_mask[:, 1:],
            "dataset": np.full((b,), d, np.int32),
            "truncated": (q_cut + d_cut.reshape(b, 1 + k).sum(axis=1)).astype(np.int32),
        }

    def _media_batch(self, ds: PairDataset, records, queries: list[Item], docs: list[Item], d: int, k: int):
        """The batch as the model's processor renders it (see the module doc)."""
        b = len(records)
        where = [ds.where[r] for r in records]
        out: dict[str, np.ndarray] = {}
        cut = np.zeros(b, np.int32)
        sides = (("query", queries, self.query_max_length, 1), ("doc", docs, self.doc_max_length, 1 + k))
        for role, items, length, per_row in sides:
            media = self._media[d][role]
            rendered = [self.processor.render(item, length, where=where[i // per_row]) for i, item in enumerate(items)]
            cut += np.asarray([r.text_truncated for r in rendered], np.int32).reshape(b, per_row).sum(axis=1)
            arrays = collate(rendered, self.processor, rows=len(rendered), max_length=length, fixed=True, media=media)
            if role == "query":
                out.update({f"query_{key}": v for key, v in arrays.items()})
                continue
            for key, v in arrays.items():  # negatives [B, K, ...] even when K = 0, as text batches have them
                v = v.reshape(b, per_row, *v.shape[1:])
                out[f"positive_{key}"], out[f"negative_{key}"] = v[:, 0], v[:, 1:]
        return {**out, "dataset": np.full((b,), d, np.int32), "truncated": cut}

    def _tokenize(self, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ids, mask [n, length] (right padding) and whether each text was truncated [n]."""
        enc = self.tokenizer(texts, truncation=True, max_length=length, return_overflowing_tokens=True)
        owner = np.asarray(enc["overflow_to_sample_mapping"])
        first = np.searchsorted(owner, np.arange(len(texts)))  # overflow rows follow their text's first row
        ids, mask = pad_rows([enc["input_ids"][row] for row in first], length, pad_id(self.tokenizer))
        return ids, mask, np.bincount(owner, minlength=len(texts)) > 1


def _text_only(prefix, item: Item) -> Item:
    """Instructions go on texts, never on media items."""
    return prefix(item) if isinstance(item, str) else item


def pairs_dataset(batches: PairBatches, num_batches: int | None = None) -> grain.MapDataset:
    """A grain dataset whose element i is `batches[i]` (endless by default); its iterator's state is a
    position, so checkpoints resume on the exact batch."""
    return grain.MapDataset.range(num_batches or sys.maxsize).map(batches.__getitem__)
