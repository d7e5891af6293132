"""Records from files and hub datasets, each with where it came from: the one reader of the data package,
the evaluations and the CLI.

A record is what one line or row holds: a `.jsonl` line (any JSON value; blank lines are skipped), a `.csv`
row (a mapping, its header naming the fields), a `.parquet` row, a `.txt` line (`{text_field: line}`, blank
lines included — callers decide), or a row of a hub dataset (`hf:NAME[:CONFIG]`, its split). Every record
comes with its origin: `FILE:LINE` (1-based; a CSV row's last line), `FILE: row N` or `hf:NAME[SPLIT] row N`,
and every error this module raises names the file and line (or row), so a bad record is found at once.
Files are decoded as UTF-8 line by line, so even an encoding error says where it is.

The row contract (`ROWS`): each kind of record the project reads declares its fields — the default key,
whether a record must hold it, and the kinds of value it takes (`VALUE_KINDS`). Readers check values
against it. Media join as table rows, not as new readers: an `image` kind (a path, or `{"image": …}`) and an
`audio` kind (a path, or `{"array", "sampling_rate"}`) added to `VALUE_KINDS` and listed by the fields
that take them.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.paths import user_path

HUB_PREFIX = "hf:"
FILE_FORMATS = (".jsonl", ".csv", ".parquet", ".txt")
Record = tuple[str, Any]  # (where, record)


# --- the row contract ------------------------------------------------------------------------------


# value kind -> (whether a value is of it, how a message names it)
VALUE_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "text": (lambda v: isinstance(v, str), "a string"),
    "texts": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "id": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "null": (lambda v: v is None, "null"),
    "media": (
        lambda v: isinstance(v, dict) and bool({"image", "audio"} & set(v)) and set(v) <= {"image", "audio", "text"},
        'an {"image" or "audio": ..., "text": optional} object',
    ),
}


@dataclass(frozen=True)
class Field:
    """One field of a kind of record: its default key (settings may rename it), whether a record must hold
    it, and the value kinds it takes (`VALUE_KINDS`)."""

    key: str
    kinds: tuple[str, ...] = ("text",)
    required: bool = True

    def accepts(self, value: Any) -> bool:
        return any(VALUE_KINDS[k][0](value) for k in self.kinds)

    @property
    def expected(self) -> str:
        return " or ".join(VALUE_KINDS[k][1] for k in self.kinds)


# The kinds of record the project reads, and their fields (labels and tags are checked by `data.labeled`,
# against the label map).
ROWS: dict[str, tuple[Field, ...]] = {
    "document": (Field("text"),),  # MNTP corpora, held-out sets, `bidirlm embed` input
    "pair": (
        Field("query", ("text", "media")),
        Field("positive", ("text", "media")),
        Field("negatives", ("texts",), required=False),
        Field("dataset", required=False),
    ),
    "labeled": (Field("text"), Field("text_pair", required=False)),  # sequence tasks, beside `label`
    "beir": (  # a line holds a text, an image or audio path (relative to its file), or a path and a text
        Field("_id", ("text", "id")),
        Field("text", required=False),
        Field("title", ("text", "null"), required=False),
        Field("image", required=False),
        Field("audio", required=False),
    ),
}


def row_field(row: str, key: str) -> Field:
    """The field `key` of the kind of record `row`."""
    return next(f for f in ROWS[row] if f.key == key)


# --- files -----------------------------------------------------------------------------------------


def expand(path: str | os.PathLike, extensions: Sequence[str], formats: str) -> list[Path]:
    """The files a local source names, each once, sorted: a file, a directory's files with one of
    `extensions` (recursive, hidden ones skipped) or a glob of them. `formats` says in errors what the
    caller accepts."""
    text = os.fspath(user_path(path))
    if any(c in text for c in "*?["):
        matches = glob.glob(text, recursive=True)
        if not matches:
            raise ConfigError(f"no files match {text}; give {formats}")
        # `dir/**` matches a directory, its subdirectories and their files, each naming the same files again
        return sorted({f for m in matches for f in _files(Path(m), extensions, formats)})
    return _files(Path(text), extensions, formats)


def _files(path: Path, extensions: Sequence[str], formats: str) -> list[Path]:
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.suffix in extensions and p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts)
        )
        if not files:
            raise ConfigError(f"directory {path} holds no {'/'.join(extensions)} files; give {formats}")
        return files
    if not path.exists():
        raise ConfigError(f"data path {path} does not exist; give {formats}")
    if path.suffix not in extensions:
        raise ConfigError(f"{path}: cannot read {path.suffix or 'extension-less'} files; give {formats}")
    return [path]


def read_lines(path: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """`(FILE:LINE, line)` for each line of a UTF-8 text file, without its line break."""
    path = Path(path)
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(
                    f"{path}:{lineno}: not UTF-8 text ({e.reason}); re-encode the file as UTF-8"
                ) from None
            yield f"{path}:{lineno}", line.rstrip("\r\n")


def _jsonl(path: Path, text_field: str) -> Iterator[Record]:
    for where, line in read_lines(path):
        if not line.strip():
            continue
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None


def _txt(path: Path, text_field: str) -> Iterator[Record]:
    for where, line in read_lines(path):
        yield where, {text_field: line}


def _csv(path: Path, text_field: str) -> Iterator[Record]:
    # Decoded line by line (errors name their line), then parsed strictly (a broken quote is an error, not a
    # silently merged row); a quoted field may span lines.
    reader = csv.DictReader((line + "\n" for _, line in read_lines(path)), strict=True)
    try:
        for row in reader:
            yield f"{path}:{reader.line_num}", row
    except csv.Error as e:
        raise ConfigError(f"{path}:{reader.line_num}: not a CSV row ({e}); check the quoting") from None


def _parquet(path: Path, text_field: str, columns: Sequence[str] | None = None) -> Iterator[Record]:
    import pyarrow
    import pyarrow.parquet as pq  # installed with `datasets`

    try:
        table = pq.ParquetFile(path)
    except (OSError, pyarrow.ArrowException) as e:
        raise ConfigError(f"{path}: not a readable parquet file ({e})") from None
    names = table.schema_arrow.names
    for column in columns or ():
        if column not in names:
            raise ConfigError(
                f"{path}: no {column!r} column (columns {names}); name the column that holds it in the config"
            )
    row = 0
    for batch in table.iter_batches(columns=list(columns) if columns else None, batch_size=4096):
        for record in batch.to_pylist():
            row += 1
            yield f"{path}: row {row}", record


_READERS = {".jsonl": _jsonl, ".txt": _txt, ".csv": _csv}


def read_file(path: Path, *, text_field: str = "text", columns: Sequence[str] | None = None) -> Iterator[Record]:
    """The records of one file, by its extension (`FILE_FORMATS`); `columns` limits a parquet read to the
    fields the caller uses (each must exist), and `text_field` is the field a `.txt` line fills."""
    if path.suffix == ".parquet":
        return _parquet(path, text_field, columns)
    if path.suffix not in _READERS:
        raise ConfigError(f"{path}: cannot read {path.suffix or 'extension-less'} files; give one of {FILE_FORMATS}")
    return _READERS[path.suffix](path, text_field)


# --- hub datasets ----------------------------------------------------------------------------------


def hub_dataset(spec: str, split: str, *, streaming: bool = False) -> Any:
    """`datasets.load_dataset` of `NAME[:CONFIG]` (`spec`, without `hf:`), its `split`; `streaming` reads
    rows as they come, for corpora larger than memory."""
    import datasets

    name, _, config = spec.partition(":")
    try:
        return datasets.load_dataset(name, config or None, split=split, streaming=streaming)
    except Exception as e:  # the hub raises many types (offline, unknown name or split, gated)
        raise ConfigError(
            f"cannot {'stream' if streaming else 'load'} hub dataset {name!r} (config {config or None}, split "
            f"{split!r}): {e}; check the name, the split and the network, or download it and give local files"
        ) from None


def hub_records(spec: str, split: str, rows: Any) -> Iterator[Record]:
    """`(hf:NAME[SPLIT] row N, row)` for the rows of a hub dataset (`hub_dataset`)."""
    for i, row in enumerate(rows, 1):
        yield f"{HUB_PREFIX}{spec}[{split}] row {i}", row


def read_records(
    source: str | os.PathLike,
    *,
    extensions: Sequence[str],
    formats: str,
    split: str = "train",
    streaming: bool = False,
    text_field: str = "text",
    columns: Sequence[str] | None = None,
) -> Iterator[Record]:
    """Every record of a source, in order: `hf:NAME[:CONFIG]` (its `split`), or the files `expand` finds
    (those with one of `extensions`; `formats` says in errors what the caller accepts)."""
    text = os.fspath(source)
    if text.startswith(HUB_PREFIX):
        spec = text[len(HUB_PREFIX) :]
        yield from hub_records(spec, split, hub_dataset(spec, split, streaming=streaming))
        return
    for path in expand(text, extensions, formats):
        yield from read_file(path, text_field=text_field, columns=columns)
