"""What the encoder commands read: one text, image or clip per line of a `.txt` / `.jsonl` file, in order
(row i of an output is line i), each with its `file:line` for error messages."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bidirlm_jax.errors import ConfigError

MEDIA_FIELDS = ("image", "audio")


def read_items(path: str | os.PathLike, *, text_field: str = "text") -> tuple[list[Any], list[str]]:
    """(items, `file:line` of each): one text per line of a .txt file (blank lines too: row i of the output is
    line i), or per line of a .jsonl file its `text_field`, or, when the line has an "image" or "audio" field
    (a path relative to the file's directory), a media item `{"image"/"audio": path, "text": optional}`."""
    from bidirlm_jax.data.records import ROWS, read_file

    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise ConfigError(f"{path}: give a .txt file (one text per line) or a .jsonl file (a {text_field!r} field)")
    if not path.is_file():
        raise ConfigError(f"input file {path} does not exist")
    text = ROWS["document"][0]
    items, wheres = [], []
    for where, record in read_file(path, text_field=text_field):
        media = {k: str(path.parent / record[k]) for k in MEDIA_FIELDS if isinstance(record, dict) and record.get(k)}
        if media:
            if record.get(text_field) is not None and not text.accepts(record[text_field]):
                raise ConfigError(f"{where}: {text_field!r} must be a string beside {sorted(media)}")
            items.append({**media, **({"text": record[text_field]} if record.get(text_field) else {})})
        elif not isinstance(record, dict) or not text.accepts(record.get(text_field)):
            raise ConfigError(
                f"{where}: no string {text_field!r} field (nor an image or audio path); add it or name the field "
                "with --text-field"
            )
        else:
            items.append(record[text_field])
        wheres.append(where)
    if not any(not isinstance(i, str) or i.strip() for i in items):
        raise ConfigError(f"input file {path} holds no text; nothing to embed")
    return items, wheres


def read_texts(path: str | os.PathLike, *, text_field: str = "text") -> list[str]:
    """`read_items` of a file that must hold text only."""
    items, wheres = read_items(path, text_field=text_field)
    for item, where in zip(items, wheres):
        if not isinstance(item, str):
            raise ConfigError(f"{where}: holds {sorted(set(item) - {'text'})}; this input takes text only")
    return items
