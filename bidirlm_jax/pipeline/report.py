"""The pipeline's report: the variant table with deltas vs Base (the paper's Figure 2 presentation), the plot
of those deltas, chance levels and a training run's loss line. The ablation draws its plots with these too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bidirlm_jax.pipeline.variants import BASE

# The demo's retrieval metrics: (key, label).
METRICS = (("ndcg_at_10", "nDCG@10"), ("mrr_at_10", "MRR@10"), ("recall_at_100", "R@100"))


def chance_level(num_documents: int) -> dict[str, float]:
    """The expected metrics of a random ranking when each query has one relevant document among `num_documents`."""
    n = num_documents
    return {
        "ndcg_at_10": sum(1 / np.log2(r + 1) for r in range(1, min(10, n) + 1)) / n,
        "mrr_at_10": sum(1 / r for r in range(1, min(10, n) + 1)) / n,
        "recall_at_100": min(100, n) / n,
    }


def pyplot():
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
    plt = pyplot()
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


def loss_summary(run: Path) -> str:
    """A training run's first and last logged loss (and masked accuracy, for MNTP), for a phase's line."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not rows:
        return "no logged steps"
    text = f"loss {rows[0]['loss']:.2f} -> {rows[-1]['loss']:.2f}"
    if "masked_accuracy" in rows[-1]:
        text += f", masked accuracy {rows[0]['masked_accuracy']:.2f} -> {rows[-1]['masked_accuracy']:.2f}"
    return text


def format_table(results: dict[str, dict[str, float]], num_queries: int, num_documents: int) -> str:
    """The variant table: each metric ×100 and its delta vs Base (the paper's Figure 2 plots the deltas)."""
    base = results.get("Base")
    head = f"{'variant':<22} {'attention':<14}" + "".join(f"{label:>9} {'Δ':>6}" for _, label in METRICS)
    lines = [
        f"retrieval on held-out standard-library packages: {num_queries} queries (summary lines), "
        f"{num_documents} documents (docstring bodies); ×100, Δ vs Base",
        head,
        "-" * len(head),
    ]
    for name, row in results.items():
        cells = ""
        for key, _ in METRICS:
            value = 100 * row[key]
            delta = "" if base is None or name == "Base" else f"{value - 100 * base[key]:+6.1f}"
            cells += f"{value:9.1f} {delta:>6}"
        lines.append(f"{name:<22} {row['attention']:<14}{cells}")
    chance = chance_level(num_documents)
    lines.append(f"{'(chance)':<22} {'':<14}" + "".join(f"{100 * chance[key]:9.1f} {'':>6}" for key, _ in METRICS))
    return "\n".join(lines)


def format_cross_modal(results: Mapping[str, Mapping[str, Any]], sizes: Mapping[str, str]) -> str:
    """The Omni stage's table: each model's nDCG@10 / R@100 (×100) per task, "–" where it lacks the modality;
    `sizes[task]` says what the task's held-out set holds."""
    tasks = list(sizes)
    head = f"{'model':<22}" + "".join(f"{'text→' + t + ' nDCG@10':>22} {'R@100':>6}" for t in tasks)
    lines = ["retrieval across modalities, held out (×100): " + "; ".join(f"text→{t}: {s}" for t, s in sizes.items())]
    lines += [head, "-" * len(head)]
    for name, row in results.items():
        cells = ""
        for task in tasks:
            m = row["tasks"].get(task)
            cells += f"{100 * m['ndcg_at_10']:22.1f} {100 * m['recall_at_100']:6.1f}" if m else f"{'–':>22} {'–':>6}"
        lines.append(f"{name:<22}{cells}")
    return "\n".join(lines)


def plot_cross_modal(results: Mapping[str, Mapping[str, Any]], path: str | os.PathLike, title: str) -> Path:
    """Grouped bars: one group per task (text→text, text→image, text→audio), one bar per model (nDCG@10 ×100)."""
    plt = pyplot()
    path = Path(path)
    tasks = list(dict.fromkeys(t for row in results.values() for t in row["tasks"]))
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=120)
    width = 0.8 / len(results)
    for k, (name, row) in enumerate(results.items()):
        shown = [(i, t) for i, t in enumerate(tasks) if t in row["tasks"]]
        xs = [i + (k - (len(results) - 1) / 2) * width for i, _ in shown]
        bars = ax.bar(xs, [100 * row["tasks"][t]["ndcg_at_10"] for _, t in shown], width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
    ax.set_xticks(range(len(tasks)), [f"text→{t}" for t in tasks])
    ax.set_ylabel("nDCG@10 (×100)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
