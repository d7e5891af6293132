"""Write a whole output directory, or a single file, or nothing.

Work happens in a hidden temporary sibling of the destination, which is renamed into place only when
everything succeeded, so an interrupted or failing command never leaves a half-written checkpoint.
Every file and directory is fsync'ed before the rename (and the parent after it), so a machine crash
cannot leave a "committed" directory with empty files. Temporary names carry the host and pid of the
run that made them, so a later run can remove what a killed one left behind, and nothing else.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import jax
import numpy as np
from jax.experimental import multihost_utils

from bidirlm_jax.errors import CheckpointError

_KINDS = ("tmp", "old")  # the work directory, and the previous output while it is being replaced
_SUFFIX = re.compile(r"(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}")
_PATH_BYTES = 4096  # PATH_MAX: the longest path process 0 broadcasts


def check_destination(dst: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Refuse an existing destination unless `overwrite`, or one we could not create; call it before
    doing any expensive work."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise CheckpointError(f"output {dst} already exists; choose another path or pass --overwrite to replace it")
    ancestor = dst.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CheckpointError(f"cannot create output {dst}: {ancestor} is a file, not a directory; choose another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CheckpointError(
            f"cannot create output {dst}: directory {ancestor} is not writable; choose another path or fix permissions"
        )
    return dst


def fsync_tree(path: str | os.PathLike) -> None:
    """Flush every file and directory under `path` (and `path` itself) to stable storage."""
    for root, _, files in os.walk(path):
        for name in files:
            file = os.path.join(root, name)
            if not os.path.islink(file):
                _fsync(file, os.O_RDONLY)
        _fsync(root, os.O_RDONLY | os.O_DIRECTORY)


def remove_stale_temporaries(dst: str | os.PathLike) -> None:
    """Delete the temporary siblings of `dst` that runs of this host, now dead, left behind."""
    dst = Path(dst)
    for kind in _KINDS:
        prefix = f".{dst.name}.{kind}-"
        for entry in dst.parent.glob(f"{glob.escape(prefix)}*"):
            m = _SUFFIX.fullmatch(entry.name[len(prefix) :])
            if m and m["host"] == _host() and not _alive(int(m["pid"])):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)


def write_atomically(path: str | os.PathLike, content: str | bytes | Callable[[BinaryIO], object]) -> Path:
    """Write the single file `path` whole or not at all: into a temporary sibling (named as `atomic_directory`
    names its own, so `remove_stale_temporaries` knows it), fsync'ed, then renamed over `path`; on any failure
    the temporary is removed and `path` keeps what it held. `content`: text (UTF-8), bytes, or a function that
    writes into the open binary file (e.g. `lambda f: np.save(f, array)`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:  # 0o666: the umask applies
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, *, overwrite: bool = False, collective: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces `dst` when the block exits without an exception.

    `collective=True`: every process of a multi-process run enters the block with the same temporary
    path (a shared file system, as orbax needs); process 0 creates and commits it after all processes
    finished, and the others learn whether it succeeded. An exception raised in one process only
    leaves the others waiting, as with any collective.
    """
    multi = collective and jax.process_count() > 1  # only a collective output starts jax's backend
    lead = not multi or jax.process_index() == 0
    tmp, failure = None, None
    if lead:
        try:
            dst = check_destination(dst, overwrite=overwrite)
            dst.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(dst)
            tmp = _sibling(dst, "tmp")
            tmp.mkdir()
        except BaseException as e:
            failure = e
    if multi:
        tmp = _broadcast_path(tmp)
    if failure is not None:
        raise failure
    if tmp is None:
        raise CheckpointError(f"process 0 could not create {dst}; its log says why")
    try:
        yield tmp
    except BaseException:
        if lead:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if multi:
        multihost_utils.sync_global_devices(f"bidirlm atomic_directory {tmp.name}")
    if lead:
        try:
            _commit(tmp, Path(dst), overwrite=overwrite)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            failure = e
    if multi and not _broadcast_flag(failure is None) and failure is None:
        raise CheckpointError(f"process 0 could not commit {dst}; its log says why")
    if failure is not None:
        raise failure


def _commit(tmp: Path, dst: Path, *, overwrite: bool) -> None:
    """fsync everything, re-check the destination (something may have appeared meanwhile), rename."""
    fsync_tree(tmp)
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            raise CheckpointError(
                f"output {dst} appeared while this one was being written; nothing was replaced — "
                "choose another path or pass --overwrite to replace it"
            )
        old = _sibling(dst, "old")
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            os.rename(tmp, dst)
        except OSError as e:
            raise CheckpointError(f"cannot move the finished output into {dst}: {e}") from e
    _fsync(dst.parent, os.O_RDONLY | os.O_DIRECTORY)


def _sibling(dst: Path, kind: str) -> Path:
    return dst.parent / f".{dst.name}.{kind}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a name we wrote; leave it alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _fsync(path: str | os.PathLike, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _broadcast_path(path: Path | None) -> Path | None:
    """Process 0's path (None when it failed) on every process."""
    data = np.zeros(_PATH_BYTES, np.int32)
    if path is not None:
        encoded = os.fsencode(path)
        data[: len(encoded)] = np.frombuffer(encoded, np.uint8)
    received = np.asarray(multihost_utils.broadcast_one_to_all(data)).astype(np.uint8).tobytes().rstrip(b"\0")
    return Path(os.fsdecode(received)) if received else None


def _broadcast_flag(flag: bool) -> bool:
    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))
