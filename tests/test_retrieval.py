"""Retrieval metrics against hand-computed values (ties, graded relevance) and pytrec_eval; `bidirlm eval` on BEIR."""

import json
import math

import numpy as np
import pytest

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.evals.retrieval import document_text, evaluate_retrieval, load_beir, rank, retrieval_metrics
from bidirlm_jax.io.hf import from_pretrained
from bidirlm_jax.io.tokenizer import load_tokenizer
from tests.encoders import MAX_LENGTH, make_beir, make_encoder_src, run_cli

# q1: d2 and d1 tie at 0.8 -> d2 first (id descending, as trec_eval); d9 is relevant but never retrieved.
# q2: d5 and d4 tie -> d5 first. q3 has no relevant document: not averaged.
RUN = {
    "q1": {"d3": 0.9, "d1": 0.8, "d2": 0.8, "d4": 0.5},
    "q2": {"d4": 0.7, "d5": 0.7, "d6": 0.1},
    "q3": {"d5": 0.9},
}
QRELS = {"q1": {"d1": 2, "d2": 1, "d3": 0, "d9": 1}, "q2": {"d4": 1}, "q3": {"d5": 0}}


def test_metrics_hand_computed():
    ndcg_q1 = (1 / math.log2(3) + 2 / math.log2(4)) / (2 + 1 / math.log2(3) + 1 / math.log2(4))
    ndcg_q2 = 1 / math.log2(3)
    metrics = retrieval_metrics(RUN, QRELS)
    assert metrics["num_queries"] == 2
    assert metrics["ndcg_at_10"] == pytest.approx((ndcg_q1 + ndcg_q2) / 2, abs=1e-12)
    assert metrics["mrr_at_10"] == pytest.approx(0.5, abs=1e-12)
    assert metrics["recall_at_100"] == pytest.approx((2 / 3 + 1) / 2, abs=1e-12)


def test_metrics_equal_pytrec_eval():
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = np.random.default_rng(1)
    docs = [f"d{i}" for i in range(40)]
    run = {f"q{q}": {d: float(rng.integers(0, 6)) / 5 for d in docs} for q in range(12)}  # many ties
    qrels = {q: {d: int(rng.integers(0, 4)) for d in rng.choice(docs, 8, replace=False)} for q in run}
    qrels = {q: rels for q, rels in qrels.items() if any(r > 0 for r in rels.values())}
    theirs = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100", "recip_rank"}).evaluate(run)
    metrics = retrieval_metrics(run, qrels)
    assert metrics["ndcg_at_10"] == pytest.approx(np.mean([s["ndcg_cut_10"] for s in theirs.values()]), abs=1e-9)
    assert metrics["recall_at_100"] == pytest.approx(np.mean([s["recall_100"] for s in theirs.values()]), abs=1e-9)
    # pytrec_eval's recip_rank has no cut-off: a first relevant document below rank 10 counts 0 at 10
    mrr_at_10 = np.mean([s["recip_rank"] if s["recip_rank"] >= 0.1 - 1e-12 else 0.0 for s in theirs.values()])
    assert metrics["mrr_at_10"] == pytest.approx(mrr_at_10, abs=1e-9)


def test_rank_breaks_ties_by_id_descending():
    queries = np.array([[1.0, 0.0]])
    docs = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # a and b tie (cosine), d next, c last
    assert list(rank(queries, docs, ["a", "b", "c", "d"], top_k=4)[0]) == ["b", "a", "d", "c"]
    # a tie across the cut-off keeps the id-descending document
    assert list(rank(queries, docs, ["a", "b", "c", "d"], top_k=1)[0]) == ["b"]


def test_load_beir_and_bad_layouts(tmp_path):
    beir = make_beir(tmp_path / "beir")
    data = load_beir(beir)
    assert len(data.corpus) == 24 and "q6" in data.queries and "q6" not in data.evaluated_queries()
    assert document_text("Title", "body ") == "Title body" and document_text("", " body ") == "body"
    with pytest.raises(ConfigError, match=r"qrels/dev.tsv is missing"):
        load_beir(beir, split="dev")
    (beir / "qrels" / "bad.tsv").write_text("query-id\tcorpus-id\tscore\nq1 doc1 1\n")
    with pytest.raises(ConfigError, match=r"bad.tsv:2: expected 'query-id<TAB>corpus-id<TAB>score'"):
        load_beir(beir, split="bad")
    (beir / "queries.jsonl").write_text('{"id": "q1", "text": "x"}\n')
    with pytest.raises(ConfigError, match=r"queries.jsonl:1: missing field\(s\) \['_id'\]"):
        load_beir(beir)
    with pytest.raises(ConfigError, match="not a directory"):
        load_beir(tmp_path / "nothing")


@pytest.mark.parametrize(
    "file, line, message",
    [
        (
            "corpus.jsonl",
            '{"_id": "doc3", "title": "t", "text": null}',
            r"corpus\.jsonl:4: 'text' holds null, not a string",
        ),
        (
            "corpus.jsonl",
            '{"_id": "doc3", "title": 7, "text": "x"}',
            r"corpus\.jsonl:4: 'title' holds 7, not a string or null",
        ),
        (
            "queries.jsonl",
            '{"_id": null, "text": "x"}',
            r"queries\.jsonl:4: '_id' holds null, not a string or an integer",
        ),
        ("queries.jsonl", '{"_id": "q3", "text": ["x"]}', r"queries\.jsonl:4: 'text' holds \[\"x\"\], not a string"),
    ],
)
def test_a_bad_field_fails_before_the_model_loads(tmp_path, capsys, file, line, message):
    """`bidirlm eval`: a record whose field has the wrong type exits 2 naming file and line, before the model is
    read (the model path does not even exist; a null text used to fail only when the documents were encoded)."""
    import re

    beir = make_beir(tmp_path / "beir")
    lines = (beir / file).read_text().splitlines()
    lines[3] = line
    (beir / file).write_text("\n".join(lines) + "\n")
    assert run_cli(["eval", "--model", tmp_path / "no-model", "--beir", beir]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err


@pytest.fixture(scope="module")
def qwen_src(qwen_dir, tmp_path_factory):
    return make_encoder_src(qwen_dir, tmp_path_factory.mktemp("retrieval") / "src")


def test_end_to_end_and_cli(qwen_src, tmp_path, capsys):
    beir = make_beir(tmp_path / "beir")
    model = from_pretrained(qwen_src, attention="bidirectional")
    tokenizer = load_tokenizer(qwen_src)
    kw = dict(batch_size=8, max_length=MAX_LENGTH)
    metrics = evaluate_retrieval(model, tokenizer, beir, instruction="find the passage", **kw)
    assert metrics["num_queries"] == 6 and metrics["num_documents"] == 24
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("ndcg_at_10", "mrr_at_10", "recall_at_100"))
    assert metrics["recall_at_100"] == 1.0  # 24 documents: everything is retrieved
    assert evaluate_retrieval(model, tokenizer, beir, **kw) != metrics  # the instruction reaches the queries

    out = tmp_path / "results.json"
    argv = ["eval", "--model", qwen_src, "--beir", beir, "--instruction", "find the passage", "--output", out]
    assert run_cli([*argv, "--attention", "bidirectional", "--max-length", MAX_LENGTH, "--batch-size", 8]) == 0
    printed = capsys.readouterr().out
    assert "nDCG@10" in printed and f"{metrics['ndcg_at_10']:.4f}" in printed
    saved = json.loads(out.read_text())["retrieval"][str(beir)]
    assert saved == pytest.approx(metrics, abs=1e-6)  # the same ranking re-encoded by the CLI; floats via JSON

    assert run_cli(["eval", "--model", qwen_src]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert run_cli(["eval", "--model", qwen_src, "--beir", tmp_path / "missing"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_retrieval_during_training_scores_as_the_standalone_evaluation(qwen_src, tmp_path):
    """The `retrieval` kind of `config.evals`: the BEIR data read (and checked) when the run is planned, then
    scored with the run's pooling, length and the entry's instruction, as `evaluate_retrieval` scores it."""
    from types import SimpleNamespace

    from bidirlm_jax.configs import contrastive
    from bidirlm_jax.evals.registry import EVALUATORS
    from bidirlm_jax.train.evaluation import build_evaluations

    beir = make_beir(tmp_path / "beir")
    model = from_pretrained(qwen_src, attention="bidirectional")
    tokenizer = load_tokenizer(qwen_src)
    config = contrastive.get_config("tiny")
    config.data.seq_len = MAX_LENGTH
    config.evals.retrieval.update(data=str(beir), every=5, instruction="find the passage", best_metric="ndcg_at_10")
    (evaluation,) = build_evaluations(config, SimpleNamespace(tokenizer=tokenizer), EVALUATORS)
    assert (evaluation.every, evaluation.best_metric) == (5, "ndcg_at_10")
    expected = evaluate_retrieval(model, tokenizer, beir, instruction="find the passage", max_length=MAX_LENGTH)
    assert evaluation(model) == expected  # the same computation: exactly the same scores
    config.evals.retrieval.update(best_metric="ndcg")
    with pytest.raises(ConfigError, match="evals.retrieval.best_metric='ndcg' is not one of"):
        build_evaluations(config, SimpleNamespace(tokenizer=tokenizer), EVALUATORS)
    config.evals.retrieval.update(best_metric="", data=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="is not a directory"):
        build_evaluations(config, SimpleNamespace(tokenizer=tokenizer), EVALUATORS)
