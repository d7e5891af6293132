"""io/atomic.py: all-or-nothing output directories — durable before the rename, never clobbering what
appeared meanwhile, cleaning what killed runs left behind (and nothing else) — and all-or-nothing single files."""

import contextlib
import os
import sys

import numpy as np
import pytest

from bidirlm_jax.errors import CheckpointError
from bidirlm_jax.io import atomic
from bidirlm_jax.io.atomic import atomic_directory, check_destination, write_atomically
from tests import procs


def _write(tmp):
    (tmp / "sub").mkdir()
    (tmp / "a.bin").write_bytes(b"a" * 10)
    (tmp / "sub" / "b.json").write_text("{}")


def test_output_appears_only_when_the_block_succeeds(tmp_path):
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "out") as tmp:
        _write(tmp)
        raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []
    with atomic_directory(tmp_path / "out") as tmp:
        _write(tmp)
    assert sorted(os.listdir(tmp_path)) == ["out"] and (tmp_path / "out" / "sub" / "b.json").is_file()


def test_everything_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    synced, order = [], []
    fsync, rename = os.fsync, os.rename

    def record_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        order.append("fsync")
        fsync(fd)

    def record_rename(a, b):
        order.append("rename")
        rename(a, b)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "rename", record_rename)
    with atomic_directory(tmp_path / "out") as tmp:
        _write(tmp)
    written = {str(tmp / p) for p in ("", "sub", "a.bin", "sub/b.json")}
    assert {os.path.normpath(p) for p in written} <= set(synced)
    assert order.index("rename") >= len(written) and synced[-1] == str(tmp_path)  # the parent, after the rename


@pytest.mark.parametrize("overwrite", [False, True])
def test_the_destination_is_checked_again_at_commit(overwrite, tmp_path):
    out = tmp_path / "out"
    refused = contextlib.nullcontext() if overwrite else pytest.raises(CheckpointError, match="appeared while")
    with refused, atomic_directory(out, overwrite=overwrite) as tmp:
        _write(tmp)
        out.mkdir()  # another run got there first
        (out / "theirs.txt").write_text("keep")
    assert (out / "theirs.txt").exists() != overwrite and (out / "a.bin").exists() == overwrite
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary left either way


def test_stale_temporaries_of_dead_runs_are_removed(tmp_path):
    dead = procs.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, timeout=60
    )
    dead_pid, host = int(dead.stdout), atomic._host()
    names = {
        "dead": f".out.tmp-{host}-{dead_pid}-0badf00d",
        "dead-old": f".out.old-{host}-{dead_pid}-0badf00d",
        "alive": f".out.tmp-{host}-{os.getpid()}-0badf00d",
        "other-host": f".out.tmp-elsewhere-{dead_pid}-0badf00d",
        "other-output": f".out2.tmp-{host}-{dead_pid}-0badf00d",
        "not-ours": ".out.tmp-user-files",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "partial.bin").write_bytes(b"x")
    with atomic_directory(tmp_path / "out") as tmp:
        _write(tmp)
    left = set(os.listdir(tmp_path))
    assert left == {"out"} | {names[k] for k in ("alive", "other-host", "other-output", "not-ours")}


def test_destination_checks(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(CheckpointError, match="is a file"):
        check_destination(tmp_path / "file" / "deeper" / "out")
    (tmp_path / "exists").mkdir()
    with pytest.raises(CheckpointError, match="--overwrite"):
        check_destination(tmp_path / "exists")
    assert check_destination(tmp_path / "exists", overwrite=True) == tmp_path / "exists"
    assert check_destination(tmp_path / "new" / "deeper" / "out") == tmp_path / "new" / "deeper" / "out"


def test_a_single_file_is_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "deeper" / "table.json"
    assert write_atomically(path, "first\n") == path and path.read_text() == "first\n"  # parents made
    write_atomically(path, b"second\n")
    assert path.read_bytes() == b"second\n"

    def torn(f):
        f.write(b"half of a thi")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(path, torn)
    assert path.read_text() == "second\n"  # the old content, and no temporary left beside it
    assert os.listdir(path.parent) == ["table.json"]


def test_a_single_file_is_fsynced_takes_a_writer_and_honours_the_umask(tmp_path, monkeypatch):
    synced, replaced = [], []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append(bool(synced)), replace(a, b))[1])
    path = write_atomically(tmp_path / "x.npy", lambda f: np.save(f, np.arange(3)))
    assert replaced == [True]  # fsync'ed before the rename
    np.testing.assert_array_equal(np.load(path), np.arange(3))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as a plain open() would make it, not 0o600
