"""io/shards.py: the safetensors reader and writer on their own — shard planning and the index, dtypes
round trips, byte offsets and flat slices, streamed pieces, and corrupt files."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bidirlm_jax.errors import CheckpointError, ConfigError
from bidirlm_jax.io.shards import INDEX_FILE, SINGLE_FILE, ShardReader, ShardWriter, TensorSpec, parse_size

RNG = np.random.default_rng(0)
TENSORS = {
    "a.f32": RNG.standard_normal((3, 5)).astype(np.float32),
    "b.bf16": RNG.standard_normal((7,)).astype(ml_dtypes.bfloat16),
    "c.f16": RNG.standard_normal((2, 2, 3)).astype(np.float16),
    "d.i64": np.arange(4, dtype=np.int64),
}


def _write(out, tensors=TENSORS, max_shard_bytes=10**9):
    out.mkdir(exist_ok=True)
    writer = ShardWriter(
        out, [TensorSpec(k, v.shape, v.dtype) for k, v in tensors.items()], max_shard_bytes=max_shard_bytes
    )
    for name, array in tensors.items():
        writer.write(name, array)
    writer.close()
    return out


@pytest.mark.parametrize("max_shard_bytes", [10**9, 64], ids=["single", "sharded"])
def test_round_trip_keeps_every_dtype_bit_for_bit(max_shard_bytes, tmp_path):
    reader = ShardReader(_write(tmp_path / "out", max_shard_bytes=max_shard_bytes))
    assert reader.keys() == list(TENSORS)
    for name, array in TENSORS.items():
        got = reader.get(name)
        assert got.dtype == array.dtype and reader.dtype(name) == array.dtype and got.shape == array.shape
        assert got.tobytes() == array.tobytes()
    assert reader.nbytes() == sum(a.nbytes for a in TENSORS.values())


def test_shards_are_cut_at_the_limit_and_indexed(tmp_path):
    out = _write(tmp_path / "out", max_shard_bytes=64)  # a.f32 (60 B) | b (14) + c (24) | d (32)
    index = json.loads((out / INDEX_FILE).read_text())
    assert index["weight_map"] == {
        "a.f32": "model-00001-of-00003.safetensors",
        "b.bf16": "model-00002-of-00003.safetensors",
        "c.f16": "model-00002-of-00003.safetensors",
        "d.i64": "model-00003-of-00003.safetensors",
    }
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in TENSORS.values())
    assert not (out / SINGLE_FILE).exists()
    for name, array in TENSORS.items():  # safetensors' own reader agrees with ours
        assert load_file(str(out / index["weight_map"][name]))[name].tobytes() == array.tobytes()


def test_a_tensor_larger_than_the_limit_gets_its_own_shard(tmp_path):
    out = _write(tmp_path / "out", max_shard_bytes=8)
    assert len(set(json.loads((out / INDEX_FILE).read_text())["weight_map"].values())) == len(TENSORS)


def test_offsets_and_flat_slices(tmp_path):
    path = tmp_path / "one.safetensors"
    save_file(TENSORS, str(path))
    reader = ShardReader(path)
    raw = path.read_bytes()
    for name, array in TENSORS.items():
        info = reader.info(name)
        assert raw[info.offset : info.offset + array.nbytes] == array.tobytes()
        flat = array.reshape(-1)
        np.testing.assert_array_equal(reader.read_flat(name, 1, 3), flat[1:3])
        out = np.empty(flat.size - 2, array.dtype)
        assert reader.read_flat(name, 2, out=out) is out
        np.testing.assert_array_equal(out, flat[2:])
    with pytest.raises(ValueError, match="contiguous"):
        reader.read_flat("a.f32", 0, 4, out=np.empty(4, np.float64))


def test_streamed_pieces_add_up_to_the_tensor(tmp_path):
    a = TENSORS["a.f32"]
    writer = ShardWriter(tmp_path, [TensorSpec("a", a.shape, a.dtype)])
    writer.write_stream("a", [a.reshape(-1)[:4], a.reshape(-1)[4:]], shape=a.shape)
    writer.close()
    assert ShardReader(tmp_path).get("a").tobytes() == a.tobytes()


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda w: w.write("b", np.zeros(2, np.float32)), "does not match the planned output"),
        (lambda w: w.write("a", np.zeros(2)), "is float64 but the planned output is float32"),
        (lambda w: w.write_stream("a", [np.zeros(1, np.float32)]), "wrote 4 bytes, planned 8"),
        (lambda w: w.close(), "a was never written"),
    ],
    ids=["order", "dtype", "size", "incomplete"],
)
def test_writes_that_break_the_plan_are_refused(write, message, tmp_path):
    writer = ShardWriter(tmp_path, [TensorSpec("a", (2,), np.float32), TensorSpec("b", (2,), np.float32)])
    with pytest.raises(CheckpointError, match=message):
        write(writer)


def test_duplicate_names_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="duplicate"):
        ShardWriter(tmp_path, [TensorSpec("x", (1,), np.float32)] * 2)


def _corrupt(path, how):
    good = path.read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    if how == "header-length":
        path.write_bytes(struct.pack("<Q", 10**12) + good[8:])
    elif how == "header-json":
        path.write_bytes(good[:8] + b"{" * n + good[8 + n :])
    elif how == "dtype":
        header = json.loads(good[8 : 8 + n])
        header["a.f32"]["dtype"] = "F8_E4M3"
        blob = json.dumps(header).encode().ljust(n)
        path.write_bytes(good[:8] + blob + good[8 + n :])
    elif how == "truncated":
        path.write_bytes(good[: len(good) - 16])


@pytest.mark.parametrize("how", ["header-length", "header-json", "dtype", "truncated"])
def test_corrupt_files_raise_checkpoint_errors(how, tmp_path):
    path = tmp_path / SINGLE_FILE
    save_file(TENSORS, str(path))
    _corrupt(path, how)
    with pytest.raises(CheckpointError):
        ShardReader(tmp_path)


def test_index_naming_missing_shards_or_malformed(tmp_path):
    out = _write(tmp_path / "out", max_shard_bytes=64)
    (out / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        ShardReader(out)
    (out / INDEX_FILE).write_text("{}")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        ShardReader(out)


def test_parse_size():
    assert [parse_size(s) for s in ("5GB", "500MB", "2GiB", "1.5KB", 7)] == [5 * 10**9, 5 * 10**8, 2 * 2**30, 1500, 7]
    for bad in ("five", "0MB"):
        with pytest.raises(ConfigError):
            parse_size(bad)
