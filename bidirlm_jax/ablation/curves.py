"""Learning curves of the composition study (the paper's Figures 6–8): a fine-tuning run's validation score
against its steps, read from its `metrics.jsonl`, smoothed as the paper smooths them and drawn one line per
variant.

Smoothing: the exponential moving average s₀ = x₀, sₜ = α·xₜ + (1 − α)·sₜ₋₁ with the paper's α = 0.4 (the
weight on the newest point). The table reports the raw scores; only the plot is smoothed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.pipeline.report import pyplot

ALPHA = 0.4  # the paper's EMA weight on the newest point


def ema(values: Sequence[float], alpha: float = ALPHA) -> list[float]:
    """The exponential moving average of `values` (see the module doc); `alpha` in (0, 1]."""
    if not 0.0 < alpha <= 1.0:
        raise ConfigError(f"the EMA weight alpha must lie in (0, 1], got {alpha}")
    out: list[float] = []
    for value in values:
        out.append(float(value) if not out else alpha * float(value) + (1.0 - alpha) * out[-1])
    return out


def read_curve(run: str | os.PathLike, metric: str) -> list[tuple[int, float]]:
    """`[(step, score)]` of the run's validations (`eval/<metric>` rows of `RUN/metrics.jsonl`), in step order;
    a step logged twice (a resumed run) keeps its last value."""
    path = Path(run) / "metrics.jsonl"
    points: dict[int, float] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read the learning curve of {run} ({e}); remove the run to recompute it") from None
    for line in lines:
        row = json.loads(line) if line.strip() else {}
        if f"eval/{metric}" in row:
            points[int(row["step"])] = float(row[f"eval/{metric}"])
    return sorted(points.items())


def plot_curves(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    path: str | os.PathLike,
    title: str,
    metric: str,
    *,
    alpha: float = ALPHA,
) -> Path:
    """One line per variant: its validation `metric` (×100, EMA-smoothed with `alpha`) against the steps,
    the raw points faint behind it."""
    plt = pyplot()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for name, points in curves.items():
        if not points:
            continue
        steps = np.array([s for s, _ in points])
        scores = 100 * np.array([v for _, v in points])
        (line,) = ax.plot(steps, ema(scores, alpha), label=name)
        ax.plot(steps, scores, color=line.get_color(), alpha=0.25, linewidth=0.8)
    ax.set_xlabel("fine-tuning steps")
    ax.set_ylabel(f"validation {metric} (×100, EMA α = {alpha:g})")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
