"""Documents (strings) from local text files or a `datasets` hub corpus.

A source is a path: a `.txt` file (one document per line), a `.jsonl` file (one JSON object per line,
the document in its `text` field), a `.parquet` file (a `text` column), a directory (every such file
under it, recursively) or a glob of them, always read in sorted order so that the same path gives the
same document sequence on every machine; blank documents are skipped. `hf:NAME[:CONFIG]` streams a
hub dataset (`datasets.load_dataset(..., streaming=True)`) for corpora larger than memory; the prefix
keeps a mistyped local path from turning into a download. Documents are yielded lazily, so tokenising
a large corpus never holds it in memory. Files and hub rows are read by `data.records`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bidirlm_jax.data.records import HUB_PREFIX, ROWS, expand, read_records
from bidirlm_jax.errors import ConfigError

__all__ = ["EXTENSIONS", "HUB_PREFIX", "iter_documents", "source_files"]

EXTENSIONS = (".txt", ".jsonl", ".parquet")
_FORMATS = "a .txt (one document per line), .jsonl or .parquet file, a directory or glob of them, or hf:NAME"
_TEXT = ROWS["document"][0]


def source_files(path: str | os.PathLike) -> list[Path]:
    """The files a local source names, each once, sorted; raises `ConfigError` for a missing path or a file type we cannot read."""
    return expand(path, EXTENSIONS, _FORMATS)


def iter_documents(path: str | os.PathLike, *, text_field: str = "text", split: str = "train") -> Iterator[str]:
    """Yield the source's documents in a deterministic order; raises `ConfigError` if it holds none.

    `text_field` names the `.jsonl` field, `.parquet` column or hub dataset column; `split` the hub split.
    """
    text = os.fspath(path)
    records = read_records(
        text,
        extensions=EXTENSIONS,
        formats=_FORMATS,
        split=split,
        streaming=True,
        text_field=text_field,
        columns=(text_field,),
    )
    empty = True
    for where, record in records:
        doc = _document(record, where, text_field)
        if doc.strip():
            empty = False
            yield doc
    if empty:
        raise ConfigError(f"the corpus {text} is empty (no non-blank documents); check data.path")


def _document(record: Any, where: str, text_field: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        found = f"keys {sorted(record)}" if isinstance(record, dict) else f"a JSON {type(record).__name__}"
        raise ConfigError(
            f"{where}: no {text_field!r} field ({found}); add it, or name the field holding the text "
            "(--config.data.text_field / --text-field)"
        )
    value = record[text_field]
    if not _TEXT.accepts(value):
        raise ConfigError(f"{where}: {text_field!r} holds a {type(value).__name__}, not {_TEXT.expected}")
    return value
