"""The LM input pipeline: generated corpus, token files, per-process shares, resumable iterators."""

import numpy as np
import pytest
from ml_collections import ConfigDict

from bidirlm_jax.data.lm import lm_dataset, load_tokens
from bidirlm_jax.data.synthetic import markov_tokens
from bidirlm_jax.errors import ConfigError


def test_markov_corpus_is_deterministic_and_predictable():
    a, b = markov_tokens(64, 20_000, seed=3), markov_tokens(64, 20_000, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.int32 and a.min() >= 0 and a.max() < 64
    assert not np.array_equal(a, markov_tokens(64, 20_000, seed=4))
    # Each token's most frequent successor follows it about 60% of the time: there is something to learn.
    pairs = np.stack([a[:-1], a[1:]], 1)
    top = [np.bincount(pairs[pairs[:, 0] == t, 1]).max() / max((pairs[:, 0] == t).sum(), 1) for t in range(64)]
    assert 0.5 < np.mean(top) < 0.8


def _batches(ds, n):
    it = iter(ds.to_iter_dataset())
    return [next(it)["input_ids"] for _ in range(n)]


def test_process_shares_make_up_the_global_batch():
    tokens = np.arange(40 * 8, dtype=np.int32)  # 40 windows of 8 tokens, each identified by its first token
    whole = _batches(lm_dataset(tokens, seq_len=8, global_batch=8, seed=1), 12)  # 12 batches: crosses epochs
    shares = [
        _batches(lm_dataset(tokens, seq_len=8, global_batch=8, seed=1, process_index=p, process_count=2), 12)
        for p in range(2)
    ]
    for i, batch in enumerate(whole):
        assert batch.shape == (8, 8)
        both = np.concatenate([shares[0][i], shares[1][i]])
        assert sorted(both[:, 0].tolist()) == sorted(batch[:, 0].tolist())
    firsts = np.concatenate(whole[:5])[:, 0]
    assert sorted(firsts.tolist()) == list(range(0, 320, 8))  # one epoch = each window once, shuffled
    assert firsts.tolist() != sorted(firsts.tolist())


def test_iterator_state_resumes_the_exact_stream():
    ds = lm_dataset(markov_tokens(128, 10_000, seed=0), seq_len=16, global_batch=4, seed=0)
    it = iter(ds.to_iter_dataset())
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it)["input_ids"] for _ in range(3)]
    fresh = iter(ds.to_iter_dataset())
    fresh.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(fresh)["input_ids"], want)


def _data(path: str) -> ConfigDict:
    return ConfigDict(dict(source="npy", path=path, seed=0, synthetic_tokens=100))


def test_token_files(tmp_path):
    np.save(tmp_path / "ok.npy", np.arange(100, dtype=np.uint16))
    tokens = load_tokens(_data(str(tmp_path / "ok.npy")), vocab_size=128)
    assert isinstance(tokens, np.memmap) and len(tokens) == 100
    np.save(tmp_path / "big.npy", np.array([1, 2, 500]))
    np.save(tmp_path / "2d.npy", np.zeros((4, 4), np.int32))
    (tmp_path / "junk.npy").write_text("not numpy")
    for name, message in [
        ("big", "token id 500 >= the model's vocab_size 128"),
        ("2d", "need 1-D integer ids"),
        ("junk", "is not a .npy array"),
        ("missing", "does not exist"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_tokens(_data(str(tmp_path / f"{name}.npy")), vocab_size=128)


def test_a_corpus_smaller_than_one_batch_is_refused():
    with pytest.raises(ConfigError, match="fewer than one batch"):
        lm_dataset(np.zeros(100, np.int32), seq_len=16, global_batch=8, seed=0)
