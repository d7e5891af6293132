"""The input pipeline: generated corpus, token files (checked once), LM rows, and global batches that
each process assembles from exactly the rows its devices hold (one process here, two in a subprocess)."""

import json
import os
import sys
from pathlib import Path

import grain
import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from bidirlm_jax.data import token_windows
from bidirlm_jax.data.loader import DeviceBatches, local_row_ranges
from bidirlm_jax.data.synthetic import markov_tokens
from bidirlm_jax.data.token_windows import lm_rows, load_tokens
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.sharding import make_mesh
from tests.cluster import check, run_cluster


def test_markov_corpus_is_deterministic_and_predictable():
    a, b = markov_tokens(64, 20_000, seed=3), markov_tokens(64, 20_000, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.int32 and a.min() >= 0 and a.max() < 64
    assert not np.array_equal(a, markov_tokens(64, 20_000, seed=4))
    # Each token's most frequent successor follows it about 60% of the time: there is something to learn.
    pairs = np.stack([a[:-1], a[1:]], 1)
    top = [np.bincount(pairs[pairs[:, 0] == t, 1]).max() / max((pairs[:, 0] == t).sum(), 1) for t in range(64)]
    assert 0.5 < np.mean(top) < 0.8


def test_lm_rows_are_shuffled_windows_reshuffled_each_epoch():
    tokens = np.arange(40 * 8, dtype=np.int32)  # 40 windows of 8 tokens, each identified by its first token
    rows = lm_rows(tokens, seq_len=8, global_batch=8, seed=1)
    firsts = [int(rows[i]["input_ids"][0]) for i in range(80)]
    assert rows[0]["input_ids"].dtype == np.int32 and rows[0]["input_ids"].shape == (8,)
    for epoch in (firsts[:40], firsts[40:]):
        assert sorted(epoch) == list(range(0, 320, 8)) and epoch != sorted(epoch)  # each window once, shuffled
    assert firsts[:40] != firsts[40:]


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 1, 8)])
def test_device_batches_are_consecutive_rows_in_the_batch_sharding(shape):
    rows = lm_rows(markov_tokens(128, 10_000, seed=0), seq_len=16, global_batch=8, seed=0)
    mesh = make_mesh(*shape)
    batches = DeviceBatches(rows, mesh, 8, start=3)  # a run resumed at step 3 reads batch 3 next
    assert local_row_ranges(mesh, 8) == [(0, 8)]  # one process holds every shard
    assert batches.shapes["input_ids"].shape == (8, 16)
    for b in (3, 4):
        batch = next(batches)["input_ids"]
        assert batch.sharding == batches.shapes["input_ids"].sharding
        np.testing.assert_array_equal(np.asarray(batch), np.stack([rows[b * 8 + r]["input_ids"] for r in range(8)]))


@pytest.mark.slow
def test_two_processes_read_exactly_the_rows_their_devices_hold():
    # Layouts where processes share batch shards (tensor across processes), hold disjoint ones, or
    # interleaved ones; each device must hold the rows the one-process stream puts there.
    worker = str(Path(__file__).with_name("loader_worker.py"))
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    results = run_cluster(lambda port: [[sys.executable, worker, str(i), str(port)] for i in range(2)], env, 240)
    check(results)
    for _, out, _ in results:
        assert out.count("ok ") == 4, out


def _data(path: str) -> ConfigDict:
    return ConfigDict(dict(source="npy", path=path, seed=0, synthetic_tokens=100))


def test_token_files(tmp_path):
    np.save(tmp_path / "ok.npy", np.arange(100, dtype=np.uint16))
    tokens = load_tokens(_data(str(tmp_path / "ok.npy")), vocab_size=128)
    assert isinstance(tokens, np.memmap) and len(tokens) == 100
    np.save(tmp_path / "big.npy", np.array([1, 2, 500]))
    np.save(tmp_path / "negative.npy", np.array([5, -1, 7], np.int32))  # -1 would wrap to the last embedding row
    np.save(tmp_path / "2d.npy", np.zeros((4, 4), np.int32))
    (tmp_path / "junk.npy").write_text("not numpy")
    for name, message in [
        ("big", "token id 500 >= the model's vocab_size 128"),
        ("negative", "negative token id -1"),
        ("2d", "need 1-D integer ids"),
        ("junk", "is not a .npy array"),
        ("missing", "does not exist"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_tokens(_data(str(tmp_path / f"{name}.npy")), vocab_size=128)


def test_a_token_file_is_scanned_once_and_again_only_when_it_changes(tmp_path, monkeypatch):
    scans = []
    scan = token_windows.scan_id_range
    monkeypatch.setattr(token_windows, "scan_id_range", lambda tokens: scans.append(len(tokens)) or scan(tokens))
    path = tmp_path / "tokens.npy"
    np.save(path, np.arange(3, 90, dtype=np.int32))
    load_tokens(_data(str(path)), vocab_size=128)
    load_tokens(_data(str(path)), vocab_size=128)  # the next start (or another host) reads the record
    assert scans == [87]
    assert json.loads(Path(f"{path}.stats.json").read_text())["min"] == 3
    np.save(path, np.array([1, 2, 200], np.int32))  # rewritten: the record no longer describes it
    with pytest.raises(ConfigError, match="token id 200"):
        load_tokens(_data(str(path)), vocab_size=128)
    assert scans == [87, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens.npy", "tokens.npy.stats.json"]


def test_a_token_file_in_a_read_only_directory_is_scanned_each_time(tmp_path, monkeypatch):
    path = tmp_path / "tokens.npy"
    np.save(path, np.arange(10, dtype=np.int32))

    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    # the sidecar's write (io.atomic's own failure: test_atomic)
    monkeypatch.setattr(token_windows, "write_atomically", refuse)
    for _ in range(2):
        assert len(load_tokens(_data(str(path)), vocab_size=128)) == 10
    assert os.listdir(tmp_path) == ["tokens.npy"]


def test_a_corpus_smaller_than_one_batch_is_refused():
    with pytest.raises(ConfigError, match="fewer than one batch"):
        lm_rows(np.zeros(100, np.int32), seq_len=16, global_batch=8, seed=0)


def test_device_batches_take_any_map_dataset_of_rows():
    rows = grain.MapDataset.range(6).repeat().map(lambda i: {"x": np.float32(i), "pair": np.array([i, -i])})
    mesh = make_mesh(2, 1, 1, devices=jax.devices()[:2])
    batch = next(DeviceBatches(rows, mesh, 4, start=1))
    np.testing.assert_array_equal(np.asarray(batch["x"]), [4, 5, 0, 1])
    assert batch["pair"].shape == (4, 2) and batch["x"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
