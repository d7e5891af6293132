"""User-given paths, read once through one helper so that `~` works wherever a path is taken.

bash leaves `~` alone after `--flag=` and in config values, and Python never expands it: without this,
`--config.model.init_from=~/ckpt` looks for a directory named `~` in the working directory.
"""

from __future__ import annotations

import os
from pathlib import Path


def expand_user(path: str | os.PathLike) -> str:
    """`path` with a leading `~` or `~user` expanded to that home directory; nothing else changes (a URL
    such as `gs://bucket/run` stays as it is, for the caller to accept or refuse)."""
    return os.path.expanduser(os.fspath(path))


def user_path(path: str | os.PathLike) -> Path:
    """`expand_user(path)` as a `Path`, for paths on the local file system."""
    return Path(expand_user(path))
