"""Tolerances for comparing two fp32 computations of the same value, derived from fp32 rounding.

Two programs that agree mathematically (another mesh, another kernel, another library, a chunked
loop) differ by the order in which they round: a sum of n terms regrouped moves by at most about
n·eps times the magnitude of its terms (Higham's γ_n bound), whatever the CPU or its vector width.
A tolerance written as `fp32_tol(n, scale)` says which reduction it covers and at which scale, so it
holds on every machine and stays far below the error any real bug (a missing term, a wrong weight, a
lost reduction) makes.
"""

from __future__ import annotations

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7: the spacing of fp32 numbers at 1.0 (one ULP of 1)


def fp32_tol(reduction_len: int, scale: float = 1.0) -> float:
    """The rounding bound of an fp32 reduction of `reduction_len` terms regrouped: n·eps·scale, where
    `scale` is the magnitude of the result (or of its terms, when they cancel)."""
    return reduction_len * EPS32 * float(scale)


def ulps(x, n: float = 1.0) -> np.ndarray:
    """`n` ULPs of fp32 at each value of `x`: the error of `n` correctly rounded operations on it."""
    return n * np.spacing(np.abs(np.asarray(x, np.float32)))


def merge_tol(*parts) -> np.ndarray:
    """Per entry, the fp32 rounding of a linear merge of `parts` as `merge.linear.combine` computes it
    (s·x₀ + Σ cᵢ(xᵢ − x₀)): a rounded coefficient, difference, product and sum per part, each at most one
    ULP of twice the entry's largest input."""
    largest = np.max([np.abs(np.asarray(p, np.float32)) for p in parts], axis=0)
    return ulps(2 * largest, 4 * len(parts))
