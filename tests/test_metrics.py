"""Downstream metrics equal the reference libraries on fixed predictions: scikit-learn (accuracy,
macro-F1), seqeval (entity precision / recall / F1, its default reading); Pearson and Spearman equal their
numpy formulas (the code calls scipy)."""

import math

import numpy as np
import pytest
import sklearn.metrics
from seqeval import metrics as seqeval

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.evals import metrics


@pytest.mark.parametrize("seed", range(5))
def test_accuracy_and_macro_f1_equal_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, 200)
    predictions = np.where(rng.random(200) < 0.6, labels, rng.integers(0, 6, 200))  # class 5 only predicted
    assert metrics.accuracy(labels, predictions) == pytest.approx(sklearn.metrics.accuracy_score(labels, predictions))
    expected = sklearn.metrics.f1_score(labels, predictions, average="macro", zero_division=0)
    assert metrics.macro_f1(labels, predictions) == pytest.approx(expected, abs=1e-12)


def test_macro_f1_on_string_labels_and_absent_classes():
    labels = ["pos", "neg", "neg", "neu", "pos"]
    predictions = ["pos", "pos", "neg", "pos", "other"]
    expected = sklearn.metrics.f1_score(labels, predictions, average="macro", zero_division=0)
    assert metrics.macro_f1(labels, predictions) == pytest.approx(expected)
    assert metrics.classification_metrics(labels, predictions)["accuracy"] == pytest.approx(0.4)


def _pearson(x, y) -> float:
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def _average_ranks(x):
    """1-based ranks, tied values sharing the mean of the ranks they span (Spearman's convention)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return ((last - counts + 1 + last) / 2)[inverse]


@pytest.mark.parametrize("seed", range(3))
def test_correlations_equal_their_formulas(seed):
    """Against the textbook formulas in numpy (the code calls scipy, so scipy is no independent check).
    float64 sums of 100 terms: ~100 eps64 = 2e-14, well inside 1e-12."""
    rng = np.random.default_rng(seed)
    labels = rng.normal(size=100)
    predictions = labels + rng.normal(scale=0.7, size=100)
    predictions[:10] = predictions[0]  # ties: ten values share the mean of ranks they span
    assert metrics.pearson(labels, predictions) == pytest.approx(_pearson(labels, predictions), abs=1e-12)
    expected = _pearson(_average_ranks(labels), _average_ranks(predictions))
    assert metrics.spearman(labels, predictions) == pytest.approx(expected, abs=1e-12)
    assert _average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    out = metrics.regression_metrics(labels, predictions)
    assert out["mse"] == pytest.approx(np.mean((labels - predictions) ** 2))


def test_correlation_of_a_constant_is_nan():
    assert math.isnan(metrics.pearson([1.0, 2.0, 3.0], [0.5, 0.5, 0.5]))
    assert math.isnan(metrics.spearman([1.0, 1.0], [0.0, 2.0]))


TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "E-LOC", "S-ORG"]


def _sentences(rng, n, tags):
    return [list(rng.choice(tags, int(rng.integers(1, 15)))) for _ in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_entity_scores_equal_seqeval_default(seed):
    # random tag soup: stray I- tags, type switches inside spans, IOBES tags mixed in — the lenient
    # (conlleval) reading seqeval uses by default must agree on all of it
    rng = np.random.default_rng(seed)
    labels = _sentences(rng, 60, TAGS)
    predictions = [[t if rng.random() < 0.7 else str(rng.choice(TAGS)) for t in s] for s in labels]
    ours = metrics.entity_scores(labels, predictions)
    assert ours["precision"] == pytest.approx(seqeval.precision_score(labels, predictions, zero_division=0))
    assert ours["recall"] == pytest.approx(seqeval.recall_score(labels, predictions, zero_division=0))
    assert ours["f1"] == pytest.approx(seqeval.f1_score(labels, predictions, zero_division=0))
    flat = [t for s in labels for t in s], [t for s in predictions for t in s]
    assert metrics.token_classification_metrics(labels, predictions)["accuracy"] == pytest.approx(
        sklearn.metrics.accuracy_score(*flat)
    )


def test_entities_by_hand():
    assert metrics.entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    assert metrics.entities(["I-PER", "I-PER", "B-PER"]) == [("PER", 0, 1), ("PER", 2, 2)]  # stray I- opens
    assert metrics.entities(["B-PER", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 1)]  # a type switch splits
    # one exact match (PER) of two true and two predicted entities; the LOC span differs
    labels = [["B-PER", "I-PER", "O", "B-LOC", "I-LOC"]]
    predictions = [["B-PER", "I-PER", "O", "B-LOC", "O"]]
    assert metrics.entity_scores(labels, predictions) == {"precision": 0.5, "recall": 0.5, "f1": 0.5}
    assert metrics.entity_scores([["O"]], [["O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_bad_inputs_are_refused():
    with pytest.raises(ConfigError, match="equal-length"):
        metrics.accuracy([1, 2], [1])
    with pytest.raises(ConfigError, match="no examples"):
        metrics.macro_f1([], [])
    with pytest.raises(ConfigError, match="sentence 0 has 2 tags but 1"):
        metrics.entity_scores([["O", "O"]], [["O"]])
    with pytest.raises(ConfigError, match="no sentences"):
        metrics.entity_scores([], [])
