"""A weighted mixture of packed sources with exact token proportions (e.g. 80 % English, 20 % split over
multilingual, math and code, as in the paper).

Rows all hold `seq_len` tokens, so exact token proportions are exact row proportions. Row `i` of the
mixture goes to the source a fixed periodic schedule names: over each period of `P` rows source `s`
gets exactly `weight_s · P` rows, and within it the rows are dealt as a proportionate-fair schedule
(earliest deadline first), so after any `n` rows every source's count is within 1 of `weight_s · n`.
grain's own `MapDataset.mix` truncates the weights to integers and lets errors add up over three or
more sources; this schedule does neither. Row `i` is a pure function of `i`, hence resumable, and each
row carries `source` (int32, the source's index) for per-source metrics.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Sequence
from typing import NamedTuple

import grain
import numpy as np

from bidirlm_jax.errors import ConfigError

_MAX_PERIOD = 10_000


class MixtureSource(NamedTuple):
    name: str
    weight: float
    rows: grain.MapDataset  # endless packed rows, e.g. `packing.packed_dataset(...)`


class ProportionalSchedule(grain.transforms.DatasetSelectionMap):
    """Maps mixture row `i` to `(source, row within that source)`, with exact proportions (module doc)."""

    def __init__(self, weights: Sequence[float]):
        weights = np.asarray(weights, np.float64) / np.sum(weights)
        self.period = _period(weights)
        exact = weights * self.period
        self.counts = np.floor(exact).astype(np.int64)  # largest remainder: exact whenever `_period` found one
        self.counts[np.argsort(self.counts - exact, kind="stable")[: self.period - self.counts.sum()]] += 1
        if (self.counts == 0).any():
            raise ConfigError(
                f"mixture weights {weights.round(6).tolist()}: some are below 1/{_MAX_PERIOD}; raise them"
            )
        self.sources = _deal(self.counts, self.period)
        self.ranks = np.zeros(self.period, np.int64)  # position of each row among its source's rows in the period
        for s in range(len(self.counts)):
            self.ranks[self.sources == s] = np.arange(self.counts[s])

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index: int) -> tuple[int, int]:
        cycle, j = divmod(int(index), self.period)
        source = int(self.sources[j])
        return source, cycle * int(self.counts[source]) + int(self.ranks[j])


def mixture_dataset(sources: Sequence[MixtureSource]) -> grain.MapDataset:
    """Rows of the weighted `sources` (each endless), tagged with `source`: int32, their index in `sources`."""
    names = [s.name for s in sources]
    if not sources:
        raise ConfigError("a data mixture needs at least one source")
    if len(set(names)) != len(names) or not all(names):
        raise ConfigError(f"mixture source names {names} must be non-empty and unique")
    bad = [s.name for s in sources if not (math.isfinite(s.weight) and s.weight > 0)]
    if bad:
        raise ConfigError(f"mixture weights must be positive numbers; fix those of {bad}")
    tagged = [s.rows.map(functools.partial(_tag, source=i)) for i, s in enumerate(sources)]
    return grain.MapDataset.select_from_datasets(tagged, ProportionalSchedule([s.weight for s in sources]))


def _tag(row: dict[str, np.ndarray], *, source: int) -> dict[str, np.ndarray]:
    return {**row, "source": np.int32(source)}


def _period(weights: np.ndarray) -> int:
    """The smallest number of rows in which every (normalised) weight is a whole number of rows, else the cap."""
    periods = np.arange(1, _MAX_PERIOD + 1)[:, None]
    whole = np.all(np.abs(periods * weights - np.round(periods * weights)) < 1e-9 * periods, axis=1)
    return int(periods[np.argmax(whole), 0]) if whole.any() else _MAX_PERIOD


def _deal(counts: np.ndarray, period: int) -> np.ndarray:
    """One period's sources, dealt as a proportionate-fair (Pfair) schedule on one processor.

    The k-th row of source s (share w = count / period) must fall in slots [floor((k-1)/w), ceil(k/w));
    earliest deadline first among the sources whose next row is released meets every such window, which
    is exactly "every count within 1 of w·n".
    """
    dealt = np.zeros(len(counts), np.int64)
    sources = np.empty(period, np.int64)
    for t in range(period):
        released = dealt * period // counts <= t
        deadlines = -(-(dealt + 1) * period // counts)
        sources[t] = np.argmin(np.where(released, deadlines, np.iinfo(np.int64).max))
        dealt[sources[t]] += 1
    return sources


def parse_mixture(spec: str) -> list[tuple[str, float, str]]:
    """`"NAME:WEIGHT:PATH;NAME:WEIGHT:PATH"` (`data.mixture`) → [(name, weight, path)]."""
    entries = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        fields = part.split(":", 2)
        try:
            name, weight, path = fields
            entries.append((name, float(weight), path))
        except ValueError:
            raise ConfigError(
                f"data.mixture entry {part!r} is not NAME:WEIGHT:PATH (e.g. 'english:0.8:/data/fineweb;code:0.2:/data/stack')"
            ) from None
    return entries
