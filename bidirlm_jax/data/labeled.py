"""Labeled examples for fine-tuning: reading, label maps, tokenisation with label alignment, training rows.

Sources (`read_split`): a local `.jsonl` (one JSON object per line), `.csv` (a header row) or `.parquet`
file, a directory of them (every such file under it, sorted), or `hf:NAME[:CONFIG]` (a `datasets` hub
dataset, its `split`; online only). Fields (`Fields`, all renamable):
- sequence classification / regression: `text`, optionally `text_pair` (pair tasks such as NLI), `label`
  (a class — string, integer or boolean — or, for regression, a number);
- token classification: `tokens` (a list of words) and `tags` (one tag per word, IOB2 strings such as
  `B-PER`, or `datasets` `ClassLabel` ids). In a CSV, both are space-separated strings or JSON lists.
- media (sequence tasks, a model with towers: `data.labeled_media`): `image` (a path relative to the
  record's file, or a parquet / hub image cell `{"bytes", "path"}`) or `audio` (a path, or a hub audio cell
  `{"bytes", "path"}` / `{"array", "sampling_rate"}`) beside `text` (then optional) and `label`, e.g.
  `{"image": "x.png", "text": "hypothesis", "label": 1}`; a media file that is not there is refused
  naming its file and line. A media example reads as one item `{"image"/"audio", "text"}`, so no `text_pair`.

Label maps (`LabelMap`): the class names in id order. Explicit (`finetune.labels`), else the
`ClassLabel` names of a hub dataset, else the sorted distinct labels of the training split (numbers in
numeric order; for tags `O` first). Every label of every split must be in the map: an unknown one is
refused, naming the file and line. The map is recorded with the run (`LabelMap.to_json`) so that
predictions, metrics and exports name the same classes.

Tokenisation and training rows: `data.labeled_rows`; generated tasks: `data.labeled_synthetic`.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bidirlm_jax.data.records import HUB_PREFIX, ROWS, expand, hub_dataset, hub_records, read_file
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models.heads import TASKS

EXTENSIONS = (".jsonl", ".csv", ".parquet")
_FORMATS = "a .jsonl, .csv or .parquet file, a directory of them, or hf:NAME[:CONFIG]"
_TEXT = ROWS["labeled"][0]  # texts (and words) must be strings
MEDIA = ("image", "audio")


@dataclass(frozen=True)
class Fields:
    """Where each part of an example lives in a record (`.jsonl` key, CSV / parquet / hub column)."""

    text: str = "text"
    text_pair: str = ""  # empty: single-text task
    label: str = "label"
    tokens: str = "tokens"
    tags: str = "tags"
    image: str = "image"
    audio: str = "audio"


@dataclass
class LabeledSplit:
    """One split's examples, as read (labels not yet mapped to ids). `where[i]` locates example i."""

    name: str
    source: str
    task: str
    texts: list[str] = field(default_factory=list)  # sequence tasks
    pairs: list[str] | None = None  # sequence tasks with a second text
    tokens: list[list[str]] = field(default_factory=list)  # token classification
    labels: list[Any] = field(default_factory=list)  # str class / float / list[str] tags per example
    where: list[str] = field(default_factory=list)
    label_names: tuple[str, ...] | None = None  # the hub dataset's ClassLabel names, in id order
    media: list[dict[str, Any]] | None = None  # per example {"image"/"audio": ...} ({} for text alone), if any

    @property
    def media_kinds(self) -> tuple[str, ...]:
        """The media the split holds ("image", "audio"), in that order."""
        held = set().union(*self.media) if self.media else set()
        return tuple(k for k in MEDIA if k in held)

    def __len__(self) -> int:
        return len(self.labels)


# --- reading --------------------------------------------------------------------------------------


def _class_names(feature: Any) -> tuple[str, ...] | None:
    """A `datasets` ClassLabel's names, or a sequence-of-ClassLabel's (token tags)."""
    names = getattr(feature, "names", None)
    if names is None:
        names = getattr(getattr(feature, "feature", None), "names", None)
    return tuple(names) if names else None


def _hub(spec: str, split: str, fields: Fields, label_field: str):
    """(records, ClassLabel names); image and audio columns read undecoded (`{"bytes", "path"}`), as parquet
    cells are, so the media processor decodes them as it decodes files."""
    rows = hub_dataset(spec, split)
    features = rows.features or {}
    for key in (fields.image, fields.audio):
        kind = type(features.get(key)).__name__
        if kind in ("Image", "Audio"):
            import datasets

            rows = rows.cast_column(key, getattr(datasets, kind)(decode=False))
    return [(None, hub_records(spec, split, rows))], _class_names(features.get(label_field))


def _local(text: str) -> list[tuple[Path, Iterator[tuple[str, Any]]]]:
    """(the file's directory, its records) per file: media paths are relative to their record's file."""
    return [(path.parent, read_file(path)) for path in expand(text, EXTENSIONS, _FORMATS)]


def _media(record: dict, fields: Fields, base: Path | None, where: str) -> dict[str, Any]:
    """A record's media fields, paths resolved against its file's directory and checked to exist."""
    out = {}
    for kind, key in (("image", fields.image), ("audio", fields.audio)):
        value = record.get(key) if key else None
        if value is None or value == "":  # absent (a CSV's empty cell): a text example
            continue
        if isinstance(value, str):
            path = Path(value) if base is None else base / value
            if not path.is_file():
                raise ConfigError(f"{where}: {kind} file not found: {path}")
            value = str(path)
        elif not isinstance(value, dict) or not ({"bytes", "path", "array"} & set(value)):
            raise ConfigError(
                f'{where}: {key!r} holds a {type(value).__name__}; give a path, or a cell {{"bytes", "path"}}'
            )
        out[kind] = value
    return out


def _get(record: Any, key: str, where: str) -> Any:
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected an object with fields, got a JSON {type(record).__name__}")
    if key not in record or record[key] is None:
        raise ConfigError(
            f"{where}: no {key!r} field (fields {sorted(record)}); add it, or name the field that holds it "
            "(--config.data.text_field / --config.finetune.*_field)"
        )
    return record[key]


def _string(value: Any, where: str, key: str) -> str:
    if not _TEXT.accepts(value):
        raise ConfigError(f"{where}: {key!r} holds a {type(value).__name__}, not {_TEXT.expected}")
    return value


def _list(value: Any, where: str, key: str) -> list:
    if isinstance(value, str):  # CSV: a JSON list or space-separated items
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise ConfigError(f"{where}: {key!r} is not a valid JSON list") from None
        else:
            value = text.split()
    if not isinstance(value, list | tuple):
        raise ConfigError(
            f"{where}: {key!r} must be a list (or, in a CSV, space-separated), got {type(value).__name__}"
        )
    return list(value)


def class_key(value: Any, where: str, names: tuple[str, ...] | None = None) -> str:
    """A class label as its name: strings as they are, integers (and integral floats) as digits, booleans
    as `True`/`False`; integer ids of a hub `ClassLabel` as its names."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int | np.integer):
        if names is not None:
            if not 0 <= value < len(names):
                raise ConfigError(f"{where}: class id {value} is outside the dataset's {len(names)} classes {names}")
            return names[value]
        return str(int(value))
    if isinstance(value, str) and value.strip():
        return value
    raise ConfigError(f"{where}: label {value!r} is not a class (a non-empty string, an integer or a boolean)")


def _number(value: Any, where: str, key: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: regression label {key!r}={value!r} is not a number") from None
    if not math.isfinite(number):
        raise ConfigError(f"{where}: regression label {key!r}={value!r} is not finite")
    return number


def read_split(
    source: str | os.PathLike, task: str, *, fields: Fields = Fields(), split: str = "train", name: str | None = None
) -> LabeledSplit:
    """Read one split of a task's examples (see the module doc); raises `ConfigError` for anything unusable,
    an empty split included. `split` picks the hub split; local files are the split they hold."""
    if task not in TASKS:
        raise ConfigError(f"task {task!r} is not one of {TASKS}")
    text = os.fspath(source)
    label_field = fields.tags if task == "token_classification" else fields.label
    names = None
    if text.startswith(HUB_PREFIX):
        files, names = _hub(text[len(HUB_PREFIX) :], split, fields, label_field)
    else:
        files = _local(text)
    out = LabeledSplit(name=name or split, source=text, task=task, label_names=names, media=[])
    if task != "token_classification" and fields.text_pair:
        out.pairs = []
    for where, record, base in ((w, r, base) for base, records in files for w, r in records):
        media = _media(record, fields, base, where) if isinstance(record, dict) else {}
        if media and (task == "token_classification" or out.pairs is not None):
            why = "token classification" if out.pairs is None else f"a text pair ({fields.text_pair!r})"
            raise ConfigError(
                f"{where}: a media example is one item (its media and one text); it cannot take {why}. Leave "
                "--config.finetune.text_pair_field empty, or fine-tune on text"
            )
        if task == "token_classification":
            words = [
                _string(w, where, fields.tokens)
                for w in _list(_get(record, fields.tokens, where), where, fields.tokens)
            ]
            tags = [class_key(t, where, names) for t in _list(_get(record, fields.tags, where), where, fields.tags)]
            if len(words) != len(tags):
                raise ConfigError(
                    f"{where}: {len(words)} {fields.tokens!r} but {len(tags)} {fields.tags!r}; give one tag per word"
                )
            if not words:
                continue  # an empty sentence scores nothing
            out.tokens.append(words)
            out.labels.append(tags)
        else:
            text_value = "" if media and record.get(fields.text) is None else _get(record, fields.text, where)
            out.texts.append(_string(text_value, where, fields.text))
            if out.pairs is not None:
                out.pairs.append(_string(_get(record, fields.text_pair, where), where, fields.text_pair))
            raw = _get(record, fields.label, where)
            out.labels.append(
                _number(raw, where, fields.label) if task == "regression" else class_key(raw, where, names)
            )
        out.media.append(media)
        out.where.append(where)
    if not out.labels:
        raise ConfigError(f"the {out.name} split ({text}) holds no examples; check the path and the split name")
    if not any(out.media):
        out.media = None  # a text split: the text path, as before
    return out


# --- label maps -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelMap:
    """A task's classes in id order (empty for regression)."""

    task: str
    names: tuple[str, ...] = ()

    @property
    def num_labels(self) -> int:
        return 1 if self.task == "regression" else len(self.names)

    @functools.cached_property
    def _ids(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    def id(self, name: str, where: str) -> int:
        try:
            return self._ids[name]
        except KeyError:
            raise ConfigError(
                f"{where}: label {name!r} is not one of the run's {len(self.names)} labels {list(self.names)}; "
                "fix the data, or list every label in --config.finetune.labels (a fresh run: the label map is "
                "recorded with a run's first checkpoint)"
            ) from None

    def to_json(self) -> dict[str, Any]:
        """`labels` plus transformers' `id2label` / `label2id` (what its config.json carries)."""
        if self.task == "regression":
            return {"task": self.task, "labels": []}
        return {
            "task": self.task,
            "labels": list(self.names),
            "id2label": {str(i): n for i, n in enumerate(self.names)},
            "label2id": {n: i for i, n in enumerate(self.names)},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LabelMap:
        return cls(d["task"], tuple(d.get("labels") or ()))


def _sort_key(name: str) -> tuple:
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


def _split_labels(split: LabeledSplit) -> Iterator[tuple[str, str]]:
    if split.task == "token_classification":
        for tags, where in zip(split.labels, split.where):
            yield from ((t, where) for t in tags)
    else:
        yield from zip(split.labels, split.where)


def build_label_map(train: LabeledSplit, *, explicit: Sequence[str] = ()) -> LabelMap:
    """The run's label map (see the module doc); every training label is checked against it."""
    if train.task == "regression":
        if explicit:
            raise ConfigError("finetune.labels lists classes, but a regression task has none; leave it empty")
        return LabelMap("regression")
    if explicit:
        names = tuple(explicit)
        if len(set(names)) != len(names):
            raise ConfigError(f"finetune.labels {list(names)} lists a label twice")
    elif train.label_names is not None:
        names = train.label_names
    else:
        seen = {label for label, _ in _split_labels(train)}
        first = ["O"] if train.task == "token_classification" and "O" in seen else []
        names = (*first, *sorted(seen - set(first), key=_sort_key))
    label_map = LabelMap(train.task, names)
    check_labels(train, label_map)
    if label_map.num_labels < 2:
        raise ConfigError(
            f"the {train.name} split ({train.source}) has a single label {list(names)}: a classifier needs at least two; "
            "list them all in --config.finetune.labels if the split simply lacks some"
        )
    return label_map


def check_labels(split: LabeledSplit, label_map: LabelMap) -> None:
    """Refuse a split holding a label the map does not know (naming where), or of another task."""
    if split.task != label_map.task:
        raise ConfigError(f"the {split.name} split is a {split.task} split, but the label map is for {label_map.task}")
    if split.task == "regression":
        return
    for label, where in _split_labels(split):
        label_map.id(label, f"{split.name} split, {where}")
