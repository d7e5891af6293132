"""The ablation's outputs: the results table (JSONL + Markdown), the plot of deltas against Base (the paper's
Figure 2, drawn by `pipeline.report.plot_deltas`, as the demo's) and the merge-ratio plot (its Figure 4).

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

from bidirlm_jax.io.atomic import write_atomically
from bidirlm_jax.pipeline.report import plot_deltas, pyplot
from bidirlm_jax.pipeline.variants import BASE


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


def write_table(rows: Sequence[Mapping[str, Any]], jsonl: str | os.PathLike, markdown: str | os.PathLike) -> str:
    """The rows as JSONL (one cell a line) and as the Markdown table (returned)."""
    write_atomically(Path(jsonl), "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
    text = markdown_table(rows)
    write_atomically(Path(markdown), text + "\n")
    return text


def plot_table(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str) -> Path:
    """Figure 2: every variant's delta vs Base on every task (`plot_deltas` with one bar per task)."""
    return plot_deltas(by_variant(rows), path, title, metrics=task_columns(rows))


def plot_sweep(
    points: Sequence[Mapping[str, float]],
    path: str | os.PathLike,
    title: str,
    metric: str,
    *,
    xlabel: str = "merging ratio: weight on the base (%)",
) -> Path:
    """Figure 4: `metric` (×100) against the merge ratio (in %; `xlabel` says on which model)."""
    plt = pyplot()
    path = Path(path)
    xs = [100 * p["ratio"] for p in points]
    ys = [100 * p[metric] for p in points]
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    ax.plot(xs, ys, marker="o")
    for x, y in zip(xs, ys):
        ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric} (×100)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
