"""Mixtures: exact proportions (every prefix within one row), rows tagged with their source, resumable, validated."""

import sys

import grain
import numpy as np
import pytest

from bidirlm_jax.data.corpus_shards import Corpus
from bidirlm_jax.data.mixture import MixtureSource, ProportionalSchedule, mixture_dataset
from bidirlm_jax.data.packing import packed_dataset
from bidirlm_jax.errors import ConfigError

PAPER = [0.8, 0.2 / 3, 0.2 / 3, 0.2 / 3]  # English; multilingual, math, code


def _counts(schedule: ProportionalSchedule, n: int) -> np.ndarray:
    sources = np.array([schedule[i][0] for i in range(n)])
    return np.cumsum(np.eye(len(schedule.counts), dtype=np.int64)[sources], axis=0)


@pytest.mark.parametrize("weights", [PAPER, [1, 1, 1], [3, 1], [0.5, 0.3, 0.2], [7, 5, 3, 2, 1], [1]])
def test_every_prefix_within_one_row_of_its_share(weights):
    schedule = ProportionalSchedule(weights)
    shares = np.asarray(weights) / np.sum(weights)
    n = 3 * schedule.period + 7
    counts = _counts(schedule, n)
    expected = np.arange(1, n + 1)[:, None] * shares
    assert np.abs(counts - expected).max() < 1
    np.testing.assert_array_equal(counts[schedule.period - 1], np.round(shares * schedule.period))  # exact per period


def test_paper_mixture_over_many_rows():
    schedule = ProportionalSchedule(PAPER)
    assert schedule.period == 15
    np.testing.assert_array_equal(_counts(schedule, 3000)[-1], [2400, 200, 200, 200])


def test_uneven_weights_use_a_capped_period():
    schedule = ProportionalSchedule([0.3137, 0.2111, 0.4752])
    shares = np.array([0.3137, 0.2111, 0.4752])
    counts = _counts(schedule, 12_000)
    assert np.abs(counts - np.arange(1, 12_001)[:, None] * schedule.counts / schedule.period).max() < 1
    assert np.abs(counts[-1] / 12_000 - shares).max() < 1e-4


def _endless(tag: int) -> grain.MapDataset:
    return grain.MapDataset.range(sys.maxsize).map(lambda i: {"x": np.int64(1000 * tag + i)})


def test_rows_carry_their_source_and_each_source_is_read_in_order():
    mixture = mixture_dataset(
        [
            MixtureSource(name, w, _endless(t))
            for t, (name, w) in enumerate(
                [("en", 0.8), ("multilingual", 0.2 / 3), ("math", 0.2 / 3), ("code", 0.2 / 3)]
            )
        ]
    )
    rows = [mixture[i] for i in range(150)]
    for source in range(4):
        xs = [int(r["x"]) for r in rows if r["source"] == source]
        assert xs == [1000 * source + k for k in range(len(xs))]
    assert all(r["source"].dtype == np.int32 for r in rows)
    assert [sum(r["source"] == s for r in rows) for s in range(4)] == [120, 10, 10, 10]


def test_packed_sources_batches_and_resume():
    def corpus(offset):
        docs = [[2, *range(offset + 3, offset + 3 + n)] for n in (5, 30, 12, 50, 8)]
        tokens = np.concatenate([np.asarray(d, np.uint32) for d in docs])
        offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
        return Corpus([(tokens, offsets)], tokenizer={"special_ids": [0, 1, 2], "pad_id": 0}, max_token_id=999)

    sources = [
        MixtureSource("big", 3, packed_dataset(corpus(0), seq_len=16, seed=0)),
        MixtureSource("small", 1, packed_dataset(corpus(500), seq_len=16, seed=0)),
    ]
    batches = mixture_dataset(sources).batch(8, drop_remainder=True)
    batch = batches[5]
    assert batch["source"].tolist().count(0) == 6 and batch["input_ids"].shape == (8, 16)
    from_small = batch["input_ids"][batch["source"] == 1]
    assert (from_small[from_small > 2] >= 500).all()  # rows come from the source they name
    it = iter(batches.to_iter_dataset())
    next(it)
    state = it.get_state()
    expected = next(it)
    resumed = iter(batches.to_iter_dataset())
    resumed.set_state(state)
    got = next(resumed)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)


def test_weights_and_names_validated():
    rows = _endless(0)
    with pytest.raises(ConfigError, match="at least one source"):
        mixture_dataset([])
    with pytest.raises(ConfigError, match="non-empty and unique"):
        mixture_dataset([MixtureSource("a", 1, rows), MixtureSource("a", 1, rows)])
    with pytest.raises(ConfigError, match=r"positive numbers; fix those of \['b', 'c'\]"):
        mixture_dataset(
            [MixtureSource("a", 1, rows), MixtureSource("b", 0, rows), MixtureSource("c", float("nan"), rows)]
        )
    with pytest.raises(ConfigError, match="below 1/10000"):
        mixture_dataset([MixtureSource("a", 1, rows), MixtureSource("b", 1e-6, rows)])
