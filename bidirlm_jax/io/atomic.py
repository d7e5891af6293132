"""Write a whole output directory or nothing.

Work happens in a hidden temporary sibling of the destination, which is renamed into place only when
everything succeeded, so an interrupted or failing command never leaves a half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bidirlm_jax.errors import CheckpointError


def check_destination(dst: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Refuse an existing destination unless `overwrite`; call it before doing any expensive work."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise CheckpointError(f"output {dst} already exists; choose another path or pass --overwrite to replace it")
    return dst


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces `dst` when the block exits without an exception."""
    dst = check_destination(dst, overwrite=overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, old / dst.name)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)
