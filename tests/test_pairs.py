"""Contrastive pairs: reading, instructions, single-dataset batches, determinism and the errors users meet."""

import json

import numpy as np
import pytest

from bidirlm_jax.data import pairs
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.tokenizer import train_tokenizer

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu", "nu"]


@pytest.fixture(scope="module")
def tokenizer():
    rng = np.random.default_rng(0)
    return train_tokenizer([" ".join(rng.choice(WORDS, 12)) for _ in range(200)] + ["Instruct: Query:"], 320)


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _records(tag: str, n: int, negatives: int = 2):
    return [
        {
            "query": f"{tag} query {i}",
            "positive": f"{tag} doc {i}",
            "negatives": [f"{tag} neg {i} {j}" for j in range(negatives)],
        }
        for i in range(n)
    ]


@pytest.fixture
def corpus(tmp_path):
    _write(tmp_path / "small.jsonl", _records("alpha", 8))
    _write(tmp_path / "large.jsonl", _records("beta", 24))
    return tmp_path


def _decode(tokenizer, ids, mask):
    return tokenizer.decode(ids[mask.astype(bool)], skip_special_tokens=True)


def test_read_one_dataset_per_file_or_field(tmp_path):
    _write(tmp_path / "a.jsonl", _records("alpha", 3) + [{**_records("beta", 1)[0], "dataset": "b"}])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(_records("gamma", 2)), tmp_path / "c.parquet")
    datasets = pairs.read_pairs(tmp_path)
    assert [(ds.name, len(ds)) for ds in datasets] == [("a", 3), ("b", 1), ("c", 2)]
    assert datasets[0].where[2] == f"{tmp_path / 'a.jsonl'}:3"
    assert datasets[2].negatives[1] == ["gamma neg 1 0", "gamma neg 1 1"]


def test_instruction_template_queries_only_vs_both_sides(tmp_path, tokenizer):
    _write(tmp_path / "retrieval.jsonl", _records("alpha", 4, negatives=1))
    _write(tmp_path / "sts.jsonl", _records("beta", 4, negatives=1))
    datasets = pairs.read_pairs(tmp_path)
    instructions = {"retrieval": ("Given a question retrieve passages", False), "sts": ("Retrieve similar text", True)}
    batches = pairs.PairBatches(
        datasets, tokenizer, batch_size=4, num_negatives=1, instructions=instructions, max_length=64
    )
    assert pairs.with_instruction("q", "do it") == "Instruct: do it\nQuery: q"
    seen = set()
    for i in range(len(batches)):
        b = batches[i]
        name = batches.names[b["dataset"][0]]
        seen.add(name)
        for r in range(4):
            query = _decode(tokenizer, b["query_ids"][r], b["query_mask"][r])
            positive = _decode(tokenizer, b["positive_ids"][r], b["positive_mask"][r])
            negative = _decode(tokenizer, b["negative_ids"][r, 0], b["negative_mask"][r, 0])
            instruction = instructions[name][0]
            assert query.startswith(f"Instruct: {instruction}\nQuery: ") and " query " in query
            if name == "sts":  # symmetric: both sides carry the instruction
                assert positive.startswith(f"Instruct: {instruction}\nQuery: beta doc")
                assert negative.startswith(f"Instruct: {instruction}\nQuery: beta neg")
            else:  # asymmetric: documents never prefixed
                assert positive.startswith("alpha doc") and negative.startswith("alpha neg")
    assert seen == {"retrieval", "sts"}


def test_batches_single_dataset_proportional_and_deterministic(corpus, tokenizer):
    datasets = pairs.read_pairs(corpus)
    make = lambda seed: pairs.PairBatches(datasets, tokenizer, batch_size=4, num_negatives=2, seed=seed, max_length=16)
    batches = make(0)
    assert len(batches) == 2 + 6  # full batches per epoch: 8/4 + 24/4
    counts = np.zeros(2, int)
    for i in range(3 * len(batches)):
        b = batches[i]
        assert len(set(b["dataset"].tolist())) == 1  # one dataset per batch
        counts[b["dataset"][0]] += 1
        assert b["query_ids"].shape == b["query_mask"].shape == (4, 16)
        assert b["positive_ids"].shape == (4, 16) and b["negative_ids"].shape == (4, 2, 16)
        assert b["query_ids"].dtype == np.int32
    assert counts.tolist() == [3 * 6, 3 * 2]  # names sorted: large, small; in proportion to size
    # every record once per epoch; the next epoch reshuffles
    epochs = [[(d, tuple(r)) for d, r in map(batches.schedule, range(e * 8, e * 8 + 8))] for e in (0, 1)]
    assert sorted(i for d, records in epochs[0] if d == 0 for i in records) == list(range(24))
    assert epochs[0] != epochs[1]
    # deterministic from the seed, random access (a fresh object, indices out of order)
    again = make(0)
    for i in (13, 2, 7):
        assert all(np.array_equal(batches[i][k], again[i][k]) for k in batches[i])
    assert any(not np.array_equal(make(1)[i]["query_ids"], batches[i]["query_ids"]) for i in range(4))


def test_weighted_sampling_and_process_shares(corpus, tokenizer):
    datasets = pairs.read_pairs(corpus)
    common = dict(batch_size=4, num_negatives=1, seed=3, max_length=16, weights={"small": 1.0, "large": 0.0})
    batches = pairs.PairBatches(datasets, tokenizer, **common)
    for i in range(10):
        d, records = batches.schedule(i)
        assert batches.names[d] == "small" and len(set(records.tolist())) == 4
    halves = [pairs.PairBatches(datasets, tokenizer, **common, process_index=p, process_count=2)[5] for p in (0, 1)]
    whole = batches[5]
    for k in whole:
        assert np.array_equal(np.concatenate([h[k] for h in halves]), whole[k])


def test_grain_dataset_resumes_by_index(corpus, tokenizer):
    batches = pairs.PairBatches(pairs.read_pairs(corpus), tokenizer, batch_size=4, max_length=16)
    it = iter(pairs.pairs_dataset(batches).to_iter_dataset())
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    fourth = next(it)
    resumed = iter(pairs.pairs_dataset(batches).to_iter_dataset())
    resumed.set_state(state)
    assert np.array_equal(next(resumed)["query_ids"], fourth["query_ids"])
    assert np.array_equal(first[1]["query_ids"], batches[1]["query_ids"])


def test_truncation_is_counted(tmp_path, tokenizer):
    long = " ".join(WORDS * 3)
    _write(
        tmp_path / "d.jsonl",
        [
            {"query": long, "positive": "alpha", "negatives": [long, "beta"]},
            {"query": "beta", "positive": "gamma", "negatives": ["delta", "eta"]},
        ],
    )
    b = pairs.PairBatches(pairs.read_pairs(tmp_path), tokenizer, batch_size=2, num_negatives=2, max_length=8)[0]
    by_query = {int(b["query_mask"][r].sum()): int(b["truncated"][r]) for r in range(2)}
    assert by_query[8] == 2  # the long query and its long negative
    assert sorted(b["truncated"].tolist()) == [0, 2]
    assert b["query_mask"].shape == (2, 8) and b["query_mask"].max() == 1


def test_record_missing_positive_names_file_and_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", _records("alpha", 2) + [{"query": "only a query"}])
    with pytest.raises(ConfigError, match=r"bad\.jsonl:3: .*\"positive\" is missing"):
        pairs.read_pairs(path)
    path = _write(tmp_path / "bad.jsonl", [{"positive": "p"}])
    with pytest.raises(ConfigError, match=r"bad\.jsonl:1: .*\"query\" is missing"):
        pairs.read_pairs(path)
    (tmp_path / "bad.jsonl").write_text('{"query": "q", "positive": "p"}\n\n{oops\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl:3: not valid JSON"):
        pairs.read_pairs(path)


def test_empty_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match=r"empty\.jsonl holds no records"):
        pairs.read_pairs(tmp_path / "empty.jsonl")


def test_batch_larger_than_dataset(corpus, tokenizer):
    with pytest.raises(
        ConfigError, match=r"dataset 'small' .*small\.jsonl.* has 8 records, fewer than one batch of 16"
    ):
        pairs.PairBatches(pairs.read_pairs(corpus), tokenizer, batch_size=16)


def test_negatives_missing_where_required(tmp_path, tokenizer):
    records = _records("alpha", 3)
    records[1] = {"query": "q", "positive": "p"}
    _write(tmp_path / "neg.jsonl", records)
    datasets = pairs.read_pairs(tmp_path)
    with pytest.raises(
        ConfigError, match=r"neg\.jsonl:2: record has 0 hard negatives but contrastive\.num_negatives .* is 1"
    ):
        pairs.PairBatches(datasets, tokenizer, batch_size=2, num_negatives=1)
    with pytest.raises(ConfigError, match=r"neg\.jsonl:1: record has 2 hard negatives .* is 3"):
        pairs.PairBatches(datasets, tokenizer, batch_size=2, num_negatives={"neg": 3})
    b = pairs.PairBatches(datasets, tokenizer, batch_size=2, num_negatives=0, max_length=8)[0]
    assert b["negative_ids"].shape == (2, 0, 8)


def test_unknown_names_in_settings(corpus, tokenizer):
    datasets = pairs.read_pairs(corpus)
    with pytest.raises(ConfigError, match="instructions name unknown datasets"):
        pairs.PairBatches(datasets, tokenizer, batch_size=4, instructions={"smal": ("x", False)})
    with pytest.raises(ConfigError, match="weights name unknown datasets"):
        pairs.PairBatches(datasets, tokenizer, batch_size=4, weights={"larg": 1.0})
    with pytest.raises(ConfigError, match="does not exist"):
        pairs.read_pairs(corpus / "missing.jsonl")
    with pytest.raises(ConfigError, match="cannot load hub dataset 'nobody/nothing'"):
        pairs.read_pairs("hf:nobody/nothing")  # offline in tests
