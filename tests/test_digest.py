"""`io.digest.directory_digest`: equal for the same files byte for byte (a copy too), different when any byte or
name changes, and with a cache, an unchanged file is not read again while a rewritten one is."""

import os
import shutil
import time

from bidirlm_jax.io import digest


def _model_dir(path, weights=b"\x01" * 64):
    path.mkdir()
    (path / "config.json").write_text('{"hidden_size": 8}')
    (path / "model.safetensors").write_bytes(weights)
    (path / ".cache").mkdir()  # hidden: not part of the model
    (path / ".cache" / "lock").write_text("x")
    return path


def test_the_digest_follows_the_bytes_and_names(tmp_path):
    a = _model_dir(tmp_path / "a")
    first = digest.directory_digest(a)
    assert len(first) == 16 and digest.directory_digest(a) == first
    b = shutil.copytree(a, tmp_path / "b", copy_function=shutil.copy)  # new files, new times, same bytes
    (b / ".cache" / "lock").write_text("other")
    assert digest.directory_digest(b) == first
    (b / "model.safetensors").write_bytes(b"\x01" * 63 + b"\x02")  # one byte of the weights
    assert digest.directory_digest(b) != first
    (b / "model.safetensors").write_bytes(b"\x01" * 64)
    (b / "model.safetensors").rename(b / "model-00001.safetensors")
    assert digest.directory_digest(b) != first


def _age(path, seconds=60):
    for file in path.rglob("*"):
        os.utime(file, (time.time() - seconds,) * 2)


def test_the_cache_reads_only_changed_files(tmp_path, monkeypatch):
    a = _model_dir(tmp_path / "a")
    cache = tmp_path / "work" / "digests.json"
    digest.directory_digest(a, cache=cache)
    assert not cache.exists()  # files written just now may change again within one timestamp tick
    _age(a)
    expected = digest.directory_digest(a)
    read = []
    file_digest = digest._file_digest
    monkeypatch.setattr(digest, "_file_digest", lambda path: read.append(path.name) or file_digest(path))
    assert digest.directory_digest(a, cache=cache) == expected and sorted(read) == ["config.json", "model.safetensors"]
    read.clear()
    assert digest.directory_digest(a, cache=cache) == expected and read == []
    (a / "model.safetensors").write_bytes(b"\x03" * 64)  # rewritten in place: same size and inode, a new time
    changed = digest.directory_digest(a, cache=cache)
    assert read == ["model.safetensors"] and changed == digest.directory_digest(a) != expected
    cache.write_text("{torn")  # an unreadable cache is only a cache
    assert digest.directory_digest(a, cache=cache) == changed
