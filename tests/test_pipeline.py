"""`bidirlm_jax.pipeline`'s parts that the demo, the ablation and notebooks share: the standard library's
corpus split by package, base pre-training, the variant table and plot. (The variants: tests/test_variants.py.)
"""

import pytest

from bidirlm_jax.errors import Preempted
from bidirlm_jax.pipeline.base import pretrain_base
from bidirlm_jax.pipeline.corpus import INSTRUCTIONS, Doc, build_corpus, held_out, stdlib_documents, summary_pairs
from bidirlm_jax.pipeline.report import chance_level, format_table, plot_deltas


def test_a_preempted_base_is_not_exported(tmp_path, monkeypatch):
    """The base's pre-training run stopped by SIGTERM (`train` says so): no base/ from a half-trained run."""
    from bidirlm_jax import train

    monkeypatch.setattr(train, "train", lambda config, workdir: {"step": 2, "preempted": True})
    texts = ["def f(x): return x + 1", "class A: pass", "import os"] * 20
    with pytest.raises(Preempted, match=f"after step 2; nothing was recorded: checkpoint saved in {tmp_path}/runs/lm"):
        pretrain_base(tmp_path, texts)
    assert not (tmp_path / "base").exists()


def test_whole_packages_are_held_out_deterministically():
    assert held_out("json") == held_out("json.decoder") == held_out("json.tool")
    docs = stdlib_documents()
    packages = sorted({d.module.split(".")[0] for d in docs})
    held = [p for p in packages if held_out(p)]
    assert 0.1 < len(held) / len(packages) < 0.3
    assert any(d.name for d in docs) and any(not d.name for d in docs)  # members and module docstrings


def test_the_corpus_keeps_the_held_out_packages_out_of_training():
    corpus = build_corpus(num_negatives=1, max_eval_queries=40)
    data = corpus.eval_data
    assert len(data.queries) == len(data.corpus) == 40 and len(data.evaluated_queries()) == 40
    held_bodies = {text for _, text in data.corpus.values()}
    held_queries = set(data.queries.values())
    assert not held_bodies & set(corpus.train_texts)
    for name, records in corpus.pairs.items():
        assert records, name
        for r in records:
            assert r["query"] not in held_queries and r["positive"] not in held_bodies
            assert len(r["negatives"]) == 1 and r["negatives"][0] != r["positive"]
    assert set(corpus.pairs) == set(INSTRUCTIONS)


def test_summary_pairs_drop_ambiguous_and_short_ones():
    docs = [
        Doc("m", "a", "Return the value of x.\n" + "x" * 60),
        Doc("m", "b", "Return the value of x.\n" + "y" * 60),  # same summary: neither is a usable query
        Doc("m", "c", "Too short body here.\nshort"),
        Doc("m", "d", ">>> import io\n" + "z" * 60),  # no real words... still three tokens, kept
        Doc("m", "e", "Emit.\n" + "w" * 60),  # one word
    ]
    assert [d.name for d, _, _ in summary_pairs(docs)] == ["d"]


def test_table_and_plot(tmp_path):
    results = {
        "Base": {"attention": "causal", "ndcg_at_10": 0.1, "mrr_at_10": 0.1, "recall_at_100": 0.5},
        "Bi+Base": {"attention": "bidirectional", "ndcg_at_10": 0.05, "mrr_at_10": 0.2, "recall_at_100": 0.5},
    }
    table = format_table(results, 10, 10)
    assert "Bi+Base" in table.splitlines()[-2] and "-5.0" in table and "+10.0" in table and "+0.0" in table
    chance = chance_level(10)  # one relevant document among ten, ranked at random
    assert chance["recall_at_100"] == 1.0 and chance["mrr_at_10"] == pytest.approx(
        sum(1 / r for r in range(1, 11)) / 10
    )
    assert table.splitlines()[-1].split()[:2] == ["(chance)", f"{100 * chance['ndcg_at_10']:.1f}"]
    png = plot_deltas(results, tmp_path / "plot.png", "title")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
