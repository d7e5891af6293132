"""mergekit's `linear` arithmetic replayed exactly (`arithmetic="mergekit"`), for outputs equal to a mergekit run.

mergekit 0.1.5 rounds every input to its compute dtype (the recipe's `dtype:`, else the inputs' common
dtype), then computes in float32 (`merge_methods/linear.py`, in recipe order):

    acc = 0;  acc = fma(xᵢ, wᵢ, acc) for each model;  acc = acc / Σ wᵢ (normalize);  → compute dtype

with the weights rounded to float32 first. torch's `addcmul_` compiles to a fused multiply-add on
AVX2/AVX-512 CPUs and on CUDA, so each step rounds once. numpy has no fma: it is computed exactly in
float64 (the product of two float32 values is exact there) and rounded to float32 through
round-to-odd, which makes the second rounding correct. Σ wᵢ is summed left to right, as torch does for
up to four weights; for longer rows torch's summation order depends on the CPU's vector width.
Our default arithmetic (`bidirlm_jax.merge.linear`) rounds once, from the stored values, instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_BLOCK = 1 << 16  # elements computed at once: the float64 temporaries stay in cache


def fma32(a: np.ndarray, b: np.float32, c: np.ndarray) -> np.ndarray:
    """a·b + c rounded once to float32 (`a`, `c` float32 arrays, `b` a float32 scalar)."""
    with np.errstate(invalid="ignore", over="ignore"):
        p = a.astype(np.float64)
        p *= np.float64(b)  # exact: 24 + 24 significant bits fit in 53
        c = c.astype(np.float64)
        s = p + c
        z = s - p
        err = s - z
        np.subtract(p, err, out=err)
        c -= z
        err += c  # s + err == p + c exactly (Knuth's two-sum: err = (p - (s - z)) + (c - z))
        # round to odd: an inexact s whose last bit is even moves one float64 ulp towards the exact value
        bits = s.view(np.int64)
        inexact_even = (err != 0) & ((bits & 1) == 0) & np.isfinite(s)
        bits += inexact_even * np.where((err > 0) == (s > 0), 1, -1)  # ±1 on the bits: away from / towards 0
        return s.astype(np.float32)


def mergekit_linear(
    xs: Sequence[np.ndarray], weights: Sequence[float], *, normalize: bool, compute_dtype: np.dtype
) -> np.ndarray:
    """mergekit's linear merge of `xs` (one array per model, in recipe order), returned in `compute_dtype`."""
    w = np.asarray(weights, np.float64).astype(np.float32)  # torch.tensor(weights, dtype=torch.float32)
    total = np.float32(0)
    for wi in w:
        total = np.float32(total + wi)
    flat = [x.reshape(-1) for x in xs]
    out = np.empty(flat[0].size, compute_dtype)
    for start in range(0, out.size, _BLOCK):
        inputs = (x[start : start + _BLOCK].astype(compute_dtype).astype(np.float32) for x in flat)
        acc = next(inputs) * w[0] + np.float32(0)  # fma(x₀, w₀, +0): one rounding, and +0 where the product is -0
        for x, wi in zip(inputs, w[1:]):
            acc = fma32(x, wi, acc)
        if normalize:
            with np.errstate(divide="ignore", invalid="ignore"):
                acc /= total
        out[start : start + _BLOCK] = acc
    return out.reshape(xs[0].shape)
