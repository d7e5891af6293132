"""Downstream-task metrics, as the paper reports them (paper-recipe.md §7.1): accuracy and macro-F1
(sequence classification), Pearson and Spearman (regression; scipy), entity-level F1 (token
classification, IOB tags).

Definitions are those of the reference libraries, so numbers compare with published ones:
- `macro_f1` = scikit-learn's `f1_score(average="macro")`: the unweighted mean of per-class F1 over the
  classes present in the labels or the predictions, a class with no true and no predicted item scoring 0.
- `entity_scores` = seqeval's default (conlleval-compatible) micro precision/recall/F1: entities are
  read from IOB1/IOB2/IOE/IOBES tags the way `seqeval.metrics.sequence_labeling.get_entities` reads them
  (a stray `I-X` opens an entity), and an entity counts only when its type and exact span match.
Undefined values (no positive prediction, a constant input to a correlation) are 0 for the F1 family
(scikit-learn's and seqeval's `zero_division` default) and NaN for correlations (scipy's).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Sequence

import numpy as np

from bidirlm_jax.errors import ConfigError


def _pair(labels, predictions, name: str) -> tuple[np.ndarray, np.ndarray]:
    y, p = np.asarray(labels), np.asarray(predictions)
    if y.shape != p.shape or y.ndim != 1:
        raise ConfigError(f"{name}: labels {y.shape} and predictions {p.shape} must be equal-length 1-D arrays")
    if y.size == 0:
        raise ConfigError(f"{name}: no examples to score")
    return y, p


def accuracy(labels: Sequence[Hashable], predictions: Sequence[Hashable]) -> float:
    y, p = _pair(labels, predictions, "accuracy")
    return float(np.mean(y == p))


def _f1(tp: int, predicted: int, actual: int) -> float:
    denominator = predicted + actual
    return 2.0 * tp / denominator if denominator else 0.0


def macro_f1(labels: Sequence[Hashable], predictions: Sequence[Hashable]) -> float:
    """Unweighted mean of per-class F1 over the classes in `labels` ∪ `predictions` (scikit-learn's macro)."""
    y, p = _pair(labels, predictions, "macro_f1")
    classes = np.unique(np.concatenate([y, p]))
    scores = [_f1(int(np.sum((y == c) & (p == c))), int(np.sum(p == c)), int(np.sum(y == c))) for c in classes]
    return float(np.mean(scores))


def _correlation(kind: str, x, y) -> float:
    from scipy import stats

    a, b = _pair(x, y, kind)
    a, b = a.astype(np.float64), b.astype(np.float64)
    if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return math.nan  # undefined (scipy returns NaN with a warning)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = stats.pearsonr(a, b) if kind == "pearson" else stats.spearmanr(a, b)
    return float(result.statistic)


def pearson(labels: Sequence[float], predictions: Sequence[float]) -> float:
    return _correlation("pearson", labels, predictions)


def spearman(labels: Sequence[float], predictions: Sequence[float]) -> float:
    return _correlation("spearman", labels, predictions)


# --- entities (seqeval's default, conlleval-compatible reading) ------------------------------------


def _split_tag(tag: str) -> tuple[str, str]:
    """`B-PER` → (`B`, `PER`), `O` → (`O`, `_`): how seqeval splits a prefix-scheme tag."""
    return tag[0], tag[1:].split("-", maxsplit=1)[-1] or "_"


def _ends(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag not in ("O", ".") and prev_type != type_


def _starts(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag not in ("O", ".") and prev_type != type_


def entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """`(type, first, last)` of every entity in one sentence's tags (inclusive span, seqeval's reading)."""
    chunks = []
    prev_tag, prev_type, begin = "O", "", 0
    for i, chunk in enumerate([*tags, "O"]):
        tag, type_ = _split_tag(str(chunk))
        if _ends(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _starts(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


def entity_scores(labels: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro precision, recall and F1 over entities (exact type and span), seqeval's `f1_score` default."""
    if len(labels) != len(predictions):
        raise ConfigError(f"entity_scores: {len(labels)} label sentences but {len(predictions)} predicted ones")
    if not labels:
        raise ConfigError("entity_scores: no sentences to score")
    true, pred = set(), set()
    for i, (y, p) in enumerate(zip(labels, predictions)):
        if len(y) != len(p):
            raise ConfigError(f"entity_scores: sentence {i} has {len(y)} tags but {len(p)} predictions")
        true.update((i, *e) for e in entities(y))
        pred.update((i, *e) for e in entities(p))
    tp = len(true & pred)
    precision = tp / len(pred) if pred else 0.0
    recall = tp / len(true) if true else 0.0
    return {"precision": precision, "recall": recall, "f1": _f1(tp, len(pred), len(true))}


def entity_f1(labels: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]]) -> float:
    return entity_scores(labels, predictions)["f1"]


# --- per task -----------------------------------------------------------------------------------


def classification_metrics(labels, predictions) -> dict[str, float]:
    return {"accuracy": accuracy(labels, predictions), "macro_f1": macro_f1(labels, predictions)}


def regression_metrics(labels, predictions) -> dict[str, float]:
    y, p = _pair(labels, predictions, "regression")
    y, p = y.astype(np.float64), p.astype(np.float64)
    return {"pearson": pearson(y, p), "spearman": spearman(y, p), "mse": float(np.mean((y - p) ** 2))}


def token_classification_metrics(labels: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]]) -> dict:
    """Entity precision / recall / F1 and word-level accuracy of tag sequences."""
    scores = entity_scores(labels, predictions)
    flat_y = [t for s in labels for t in s]
    flat_p = [t for s in predictions for t in s]
    scores["accuracy"] = accuracy(flat_y, flat_p) if flat_y else math.nan
    return scores


# The metric a task's best checkpoint is chosen by (higher is better), as the paper reports each task.
BEST_METRIC = {"classification": "accuracy", "regression": "spearman", "token_classification": "f1"}
TASK_METRICS = {
    "classification": ("accuracy", "macro_f1"),
    "regression": ("pearson", "spearman", "mse"),
    "token_classification": ("precision", "recall", "f1", "accuracy"),
}
