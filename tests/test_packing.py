"""Packing: a hand-checked row layout, splits without drops, padding only at an epoch's end, determinism, grain."""

import pickle

import grain
import numpy as np
import pytest

from bidirlm_jax.data.corpus_shards import Corpus
from bidirlm_jax.data.packing import PackedRows, packed_dataset, packing_efficiency
from bidirlm_jax.errors import ConfigError

SPECIALS = {"special_ids": [0, 1, 2], "pad_id": 0}  # 0 pad, 1 eos, 2 bos


def _corpus(docs: list[list[int]]) -> Corpus:
    tokens = np.concatenate([np.asarray(d, np.uint32) for d in docs])
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    return Corpus([(tokens, offsets)], tokenizer=SPECIALS, max_token_id=int(tokens.max()))


def _random_corpus(num_docs: int = 40, seed: int = 0) -> Corpus:
    rng = np.random.default_rng(seed)
    return _corpus([[2, *rng.integers(3, 100, rng.integers(1, 40))] for _ in range(num_docs)])


def test_hand_checked_rows():
    docs = [[2, 10, 11, 12], [2, 20, 21], [2, 30, 31, 32, 1, 34]]
    corpus = _corpus(docs)
    seed = next(s for s in range(1000) if list(PackedRows(corpus, 5, seed=s).order(0)) == [0, 1, 2])
    rows = PackedRows(corpus, 5, seed=seed)
    assert len(rows) == 3  # 13 tokens in rows of 5
    T, F = True, False
    expected = [
        # doc 0 whole, doc 1 starts
        dict(
            input_ids=[2, 10, 11, 12, 2],
            segment_ids=[1, 1, 1, 1, 2],
            positions=[0, 1, 2, 3, 0],
            maskable=[F, T, T, T, F],
        ),
        # doc 1 continues (its piece's first token has no predecessor in the row), doc 2 starts
        dict(
            input_ids=[20, 21, 2, 30, 31],
            segment_ids=[1, 1, 2, 2, 2],
            positions=[0, 1, 0, 1, 2],
            maskable=[F, T, F, T, T],
        ),
        # doc 2 continues; <eos> mid-document is special; the epoch's end is padded
        dict(
            input_ids=[32, 1, 34, 0, 0],
            segment_ids=[1, 1, 1, 0, 0],
            positions=[0, 1, 2, 0, 0],
            maskable=[F, F, T, F, F],
        ),
    ]
    for i, want in enumerate(expected):
        row = rows[i]
        assert {k: v.dtype for k, v in row.items()} == dict(
            input_ids=np.int32, segment_ids=np.int32, positions=np.int32, attention_mask=np.int32, maskable=np.bool_
        )
        assert all(v.shape == (5,) for v in row.values())
        for key, value in want.items():
            assert row[key].tolist() == value, (i, key)
        assert row["attention_mask"].tolist() == [int(s > 0) for s in want["segment_ids"]]
    assert [packing_efficiency(rows[i]) for i in range(3)] == [1.0, 1.0, 0.6]


@pytest.mark.parametrize("seq_len", [7, 16, 64])
def test_every_token_once_per_epoch_long_documents_split_padding_only_last(seq_len):
    corpus = _random_corpus()
    rows = PackedRows(corpus, seq_len, seed=1)
    assert max(corpus.lengths) > 16  # some documents are longer than a row
    for epoch in range(2):
        epoch_rows = [rows[epoch * len(rows) + i] for i in range(len(rows))]
        stream = np.concatenate([r["input_ids"][r["attention_mask"] == 1] for r in epoch_rows])
        expected = np.concatenate([corpus.document(d) for d in rows.order(epoch)])
        np.testing.assert_array_equal(stream, expected)
        assert all(r["attention_mask"].all() for r in epoch_rows[:-1])
        for r in epoch_rows:  # positions count up from 0 within each segment
            for seg in np.unique(r["segment_ids"][r["segment_ids"] > 0]):
                positions = r["positions"][r["segment_ids"] == seg]
                assert positions.tolist() == list(range(len(positions)))


def test_deterministic_per_seed_and_reshuffled_per_epoch():
    corpus = _random_corpus()
    a, b = PackedRows(corpus, 16, seed=5), PackedRows(corpus, 16, seed=5)
    assert all(np.array_equal(a[i]["input_ids"], b[i]["input_ids"]) for i in range(2 * len(a)))
    assert not np.array_equal(a.order(0), a.order(1))
    assert not np.array_equal(a.order(0), PackedRows(corpus, 16, seed=6).order(0))
    assert not np.array_equal(a[0]["input_ids"], a[len(a)]["input_ids"])
    assert np.array_equal(a[3]["input_ids"], b[3]["input_ids"])  # random access in any order
    copy = pickle.loads(pickle.dumps(a))  # as grain's worker processes receive it
    assert all(np.array_equal(copy[i]["input_ids"], a[i]["input_ids"]) for i in range(len(a) + 2))


def test_grain_batches_and_resume():
    """(Which rows each process reads is `data.loader`'s business, tested in test_train_data.)"""
    corpus = _random_corpus()
    rows = packed_dataset(corpus, seq_len=16, seed=0)
    full = rows.batch(4, drop_remainder=True)
    batch = full[2]
    assert batch["input_ids"].shape == (4, 16) and batch["maskable"].dtype == np.bool_
    # grain's iterator state resumes exactly.
    it = iter(full.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)))
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it)["input_ids"] for _ in range(2)]
    resumed = iter(full.to_iter_dataset())
    resumed.set_state(state)
    assert all(np.array_equal(next(resumed)["input_ids"], e) for e in expected)
    assert packing_efficiency(batch) == 1.0


def test_bad_settings():
    with pytest.raises(ConfigError, match="too short"):
        PackedRows(_random_corpus(), 1, seed=0)
