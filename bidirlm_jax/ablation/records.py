"""The harness's records: JSON files written whole, reused only when made with the same settings.

A record is `{"settings": ..., ...}`. `reuse` reads one back when its settings equal the current ones and
refuses it by name otherwise (`variants.settings_difference` says how they differ), so a result made with
other settings is never mixed into a table, nor silently overwritten: the user removes it to recompute it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.atomic import write_atomically
from bidirlm_jax.pipeline.variants import settings_difference

RECOMPUTE = "remove it to recompute it, or choose another --workdir"


def write_json(path: Path, record: Any) -> None:
    write_atomically(path, json.dumps(record, indent=2) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is unreadable ({e}); remove it to recompute it") from None


def reuse(path: Path, settings: dict[str, Any], what: str, *, remedy: str = RECOMPUTE) -> Any | None:
    """The record at `path` when it exists and was made with `settings`; None when it does not exist."""
    if not path.is_file():
        return None
    record = read_json(path)
    if difference := settings_difference(record.get("settings") or {}, settings):
        raise ConfigError(f"{path} holds {what} made with other settings ({difference}); {remedy}")
    return record
