"""Digests of model directories: what a result was computed from, told apart by content.

A directory's digest covers every file's relative path and bytes (weights, config, tokenizer; hidden files
aside). Bytes, not only the safetensors headers: two trainings of one architecture have the same tensor names,
shapes and offsets, so a checkpoint rebuilt, retrained or replaced in place would keep a header-only digest; a
copy (whatever its modification times) keeps this one. Reading every byte costs about a second per GB, so
`cache` (a JSON file) remembers each file's digest under its path, size, modification time and inode: a
directory that did not change is not read again, and one that did (new files have new times) is. A file
modified in the last seconds is not remembered: it could change again within the same timestamp tick.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from bidirlm_jax.io.atomic import write_atomically

RECENT_NS = 2_000_000_000  # coarser than any file system's timestamp tick


def directory_digest(root: str | os.PathLike, *, cache: str | os.PathLike | None = None) -> str:
    """A hex digest of the files under `root`: equal only for directories with the same files, byte for byte."""
    root = Path(root)
    known = _read_cache(Path(cache)) if cache is not None else {}
    seen, now = {}, time.time_ns()
    digest = hashlib.blake2b(digest_size=8)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = file.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        key, stat = str(file.resolve()), file.stat()
        signature = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        entry = known.get(key)
        if not isinstance(entry, dict) or entry.get("stat") != signature:
            entry = {"stat": signature, "digest": _file_digest(file)}
        if now - stat.st_mtime_ns > RECENT_NS:
            seen[key] = entry
        digest.update(f"{relative.as_posix()}\0{entry['digest']}\0".encode())
    if cache is not None and any(known.get(k) != v for k, v in seen.items()):
        _write_cache(Path(cache), {**known, **seen})
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _read_cache(path: Path) -> dict[str, dict]:
    """The remembered digests; an unreadable cache is only a cache, so it counts as empty."""
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def _write_cache(path: Path, table: dict[str, dict]) -> None:
    write_atomically(path, json.dumps(table, indent=1))
