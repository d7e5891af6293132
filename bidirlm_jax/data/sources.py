"""Documents (strings) from local text files or a `datasets` hub corpus.

A source is a path: a `.txt` file (one document per line), a `.jsonl` file (one JSON object per line,
the document in its `text` field), a `.parquet` file (a `text` column), a directory (every such file
under it, recursively) or a glob of them, always read in sorted order so that the same path gives the
same document sequence on every machine; blank documents are skipped. `hf:NAME[:CONFIG]` streams a
hub dataset (`datasets.load_dataset(..., streaming=True)`) for corpora larger than memory; the prefix
keeps a mistyped local path from turning into a download. Documents are yielded lazily, so tokenising
a large corpus never holds it in memory.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.paths import user_path

EXTENSIONS = (".txt", ".jsonl", ".parquet")
HUB_PREFIX = "hf:"
_FORMATS = "a .txt (one document per line), .jsonl or .parquet file, a directory or glob of them, or hf:NAME"


def source_files(path: str | os.PathLike) -> list[Path]:
    """The files a local source names, each once, sorted; raises `ConfigError` for a missing path or a file type we cannot read."""
    text = os.fspath(user_path(path))
    if any(c in text for c in "*?["):
        matches = glob.glob(text, recursive=True)
        if not matches:
            raise ConfigError(f"no files match {text}; give {_FORMATS}")
        # `dir/**` matches a directory, its subdirectories and their files, each naming the same files again
        return sorted({f for m in matches for f in data_files(Path(m), EXTENSIONS, _FORMATS)})
    return data_files(Path(text), EXTENSIONS, _FORMATS)


def data_files(path: Path, extensions: tuple[str, ...], formats: str) -> list[Path]:
    """The files `path` names: itself, or a directory's files with one of `extensions` (recursive, sorted,
    hidden ones skipped). `formats` says in errors what the caller accepts."""
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


def iter_documents(path: str | os.PathLike, *, text_field: str = "text", split: str = "train") -> Iterator[str]:
    """Yield the source's documents in a deterministic order; raises `ConfigError` if it holds none.

    `text_field` names the `.jsonl` field, `.parquet` column or hub dataset column; `split` the hub split.
    """
    text = os.fspath(path)
    if text.startswith(HUB_PREFIX):
        documents = _hub_documents(text[len(HUB_PREFIX) :], text_field, split)
    else:
        readers = {".txt": _txt_documents, ".jsonl": _jsonl_documents, ".parquet": _parquet_documents}
        documents = (doc for f in source_files(text) for doc in readers[f.suffix](f, text_field))
    empty = True
    for doc in documents:
        empty = False
        yield doc
    if empty:
        raise ConfigError(f"the corpus {text} is empty (no non-blank documents); check data.path")


def _txt_documents(path: Path, text_field: str) -> Iterator[str]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise ConfigError(
                    f"{path}:{lineno}: not UTF-8 text ({e.reason}); re-encode the file as UTF-8"
                ) from None
            if line.strip():
                yield line


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(
                    f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object"
                ) from None
            if not isinstance(record, dict) or text_field not in record:
                found = f"keys {sorted(record)}" if isinstance(record, dict) else f"a JSON {type(record).__name__}"
                raise ConfigError(
                    f"{path}:{lineno}: no {text_field!r} field ({found}); add it, or name the field holding the text "
                    "(--config.data.text_field / --text-field)"
                )
            doc = _text(record[text_field], f"{path}:{lineno}", text_field)
            if doc.strip():
                yield doc


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq  # installed with `datasets`

    table = pq.ParquetFile(path)
    if text_field not in table.schema_arrow.names:
        raise ConfigError(
            f"{path}: no {text_field!r} column (columns {table.schema_arrow.names}); "
            "name the column holding the text (--config.data.text_field / --text-field)"
        )
    row = 0
    for batch in table.iter_batches(columns=[text_field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            row += 1
            doc = _text(value, f"{path}: row {row}", text_field)
            if doc.strip():
                yield doc


def _hub_documents(spec: str, text_field: str, split: str) -> Iterator[str]:
    import datasets

    name, _, config = spec.partition(":")
    try:
        rows = datasets.load_dataset(name, config or None, split=split, streaming=True)
    except Exception as e:  # the hub raises many types (offline, unknown name, gated, bad split)
        raise ConfigError(
            f"cannot stream the datasets corpus {name!r} (config {config or None}, split {split!r}): {e}; "
            "check the name and the network, or download it and give local files"
        ) from None
    for i, row in enumerate(rows, 1):
        if text_field not in row:
            raise ConfigError(
                f"{name} row {i}: no {text_field!r} column (columns {sorted(row)}); set --config.data.text_field"
            )
        doc = _text(row[text_field], f"{name} row {i}", text_field)
        if doc.strip():
            yield doc


def _text(value: object, where: str, text_field: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {text_field!r} holds a {type(value).__name__}, not a string")
    return value
