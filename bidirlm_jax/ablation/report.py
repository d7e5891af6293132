"""The ablation's outputs: the results table (JSONL + Markdown), the plot of deltas against Base (the paper's
Figure 2) and the merge-ratio plot (its Figure 4). `bidirlm demo` draws its variant plot with `plot_deltas` too.

A row of the table is one (variant, task) cell: `{"variant", "attention", "task", "kind", "metric", "score",
"metrics", ...}` with `score` in the metric's own unit (accuracy, Spearman, entity F1, nDCG@10 in [0, 1]);
the Markdown and the plots show it ×100, with its delta against the Base row of the same task.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# The demo's retrieval metrics: (key, label).
METRICS = (("ndcg_at_10", "nDCG@10"), ("mrr_at_10", "MRR@10"), ("recall_at_100", "R@100"))
BASE = "Base"


def chance_level(num_documents: int) -> dict[str, float]:
    """The expected metrics of a random ranking when each query has one relevant document among `num_documents`."""
    n = num_documents
    return {
        "ndcg_at_10": sum(1 / np.log2(r + 1) for r in range(1, min(10, n) + 1)) / n,
        "mrr_at_10": sum(1 / r for r in range(1, min(10, n) + 1)) / n,
        "recall_at_100": min(100, n) / n,
    }


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_deltas(
    results: Mapping[str, Mapping[str, Any]],
    path: str | os.PathLike,
    title: str,
    metrics: Sequence[tuple[str, str]] = METRICS,
) -> Path:
    """Bar plot of every variant's delta vs Base (×100), one group per variant, one bar per metric (PNG).

    `results[variant][key]` holds each metric's value (in [0, 1]); `metrics` names the keys and their labels
    (the demo: nDCG@10, MRR@10, R@100; the ablation: one entry per task). A metric missing for a variant (a
    cell not computed) draws no bar. The title's second line gives Base's own values."""
    plt = _pyplot()
    path = Path(path)
    base = results[BASE]
    names = [n for n in results if n != BASE]
    fig, ax = plt.subplots(figsize=(max(9, 1.6 * len(names) * max(1, len(metrics)) / 3), 4.5), dpi=120)
    width = 0.8 / len(metrics)
    for k, (key, label) in enumerate(metrics):
        shown = [(i, n) for i, n in enumerate(names) if results[n].get(key) is not None and base.get(key) is not None]
        deltas = [100 * (results[n][key] - base[key]) for _, n in shown]
        xs = [i + (k - (len(metrics) - 1) / 2) * width for i, _ in shown]
        bars = ax.bar(xs, deltas, width, label=label)
        ax.bar_label(bars, fmt="%+.1f", fontsize=7, padding=2)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set_ylabel("Δ vs Base (points)")
    values = ", ".join(f"{label} {100 * base[key]:.1f}" for key, label in metrics if base.get(key) is not None)
    mode = f" ({base['attention']})" if "attention" in base else ""
    ax.set_title(f"{title}\nBase{mode}: {values}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# --- the ablation table -----------------------------------------------------------------------------


def by_variant(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """`{variant: {"attention": ..., task: score, ...}}`, variants and tasks in the rows' order."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        out.setdefault(row["variant"], {"attention": row["attention"]})[row["task"]] = row["score"]
    return out


def task_columns(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """`[(task, "task (metric)")]` in the rows' order."""
    seen: dict[str, str] = {}
    for row in rows:
        seen.setdefault(row["task"], f"{row['task']} ({row['metric']})")
    return list(seen.items())


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per variant, one column per task: the score ×100 and, but for Base, its delta vs Base."""
    table, columns = by_variant(rows), task_columns(rows)
    base = table.get(BASE, {})
    lines = [
        "| variant | attention | " + " | ".join(label for _, label in columns) + " |",
        "|---|---|" + "---:|" * len(columns),
    ]
    for name, scores in table.items():
        cells = []
        for task, _ in columns:
            value = scores.get(task)
            if value is None:
                cells.append("—")
                continue
            delta = "" if name == BASE or base.get(task) is None else f" ({100 * (value - base[task]):+.1f})"
            cells.append(f"{100 * value:.1f}{delta}")
        lines.append(f"| {name} | {scores['attention']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_text(path: Path, text: str) -> None:
    """Write `path` whole or not at all (a temporary sibling renamed into place)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_table(rows: Sequence[Mapping[str, Any]], jsonl: str | os.PathLike, markdown: str | os.PathLike) -> str:
    """The rows as JSONL (one cell a line) and as the Markdown table (returned)."""
    _write_text(Path(jsonl), "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
    text = markdown_table(rows)
    _write_text(Path(markdown), text + "\n")
    return text


def plot_table(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str) -> Path:
    """Figure 2: every variant's delta vs Base on every task (`plot_deltas` with one bar per task)."""
    return plot_deltas(by_variant(rows), path, title, metrics=task_columns(rows))


def plot_sweep(points: Sequence[Mapping[str, float]], path: str | os.PathLike, title: str, metric: str) -> Path:
    """Figure 4: `metric` (×100) against the merge ratio (the weight on the base, in %)."""
    plt = _pyplot()
    path = Path(path)
    xs = [100 * p["ratio"] for p in points]
    ys = [100 * p[metric] for p in points]
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    ax.plot(xs, ys, marker="o")
    for x, y in zip(xs, ys):
        ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set_xlabel("merging ratio: weight on the base (%)")
    ax.set_ylabel(f"{metric} (×100)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
