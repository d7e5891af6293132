"""How every benchmark measures, so that each figure says what it was measured under: the machine (CPU model,
cores, threads), the 1-minute load average before and after every round, the sides interleaved (their order
alternating from round to round), best / median of the per-round ratios / CPU-time ratio, and a NOISY mark on a
run taken above a load of 1.5 per core. (Imported by the scripts beside it; running it does nothing.)

    bench = Bench(threads={"torch": torch.get_num_threads()})   # prints the machine and the load
    rows = bench.rounds({"ours": run_ours, "torch": run_torch}, iters)
    bench.show_ratio("ours", "torch")
    bench.finish(out_path, extra_results)                          # prints and writes the verdict
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

NOISY_LOAD_PER_CORE = 1.5


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def machine(threads: dict[str, int] | None = None) -> dict:
    """The CPU, its cores, the cores this process may use, and the thread counts of each library."""
    return dict(
        cpu=cpu_model(), cores=os.cpu_count(), cores_used=len(os.sched_getaffinity(0)), threads=dict(threads or {})
    )


def load() -> float:
    """The machine's 1-minute load average."""
    return os.getloadavg()[0]


def cpu_seconds() -> float:
    """User + system seconds of this process (all threads) and of the children it has waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def is_noisy(loads: Sequence[float], cores: int) -> bool:
    """A run is noisy when the load went above `NOISY_LOAD_PER_CORE` per core at any reading."""
    return max(loads) > NOISY_LOAD_PER_CORE * cores


def round_order(names: Sequence[str], round_index: int) -> list[str]:
    """Every round runs each side once; odd rounds in reverse, so no side always runs first (right after the
    previous round's last side, on a cache it left warm or a load it left behind)."""
    return list(names) if round_index % 2 == 0 else list(reversed(names))


def paired_ratio(ours: dict, peer: dict) -> dict:
    """peer time / our time (>1: ours is faster) of the best rounds, the median of the per-round ratios (both
    sides ran in the same minute of each round: the figure least moved by the load), and of the best CPU times."""
    paired = [p / o for p, o in zip(peer["times"], ours["times"], strict=True)]
    ours_cpu = min(ours["cpu_times"])  # os.times counts in clock ticks: a call shorter than one reads 0
    return dict(
        best=min(peer["times"]) / min(ours["times"]),
        paired_median=statistics.median(paired),
        paired=paired,
        cpu_best=min(peer["cpu_times"]) / ours_cpu if ours_cpu > 0 else float("nan"),
    )


def summary(wall: list[float], cpu: list[float]) -> dict:
    return dict(
        best=min(wall),
        median=statistics.median(wall),
        cpu_best=min(cpu),
        cpu_median=statistics.median(cpu),
        times=wall,
        cpu_times=cpu,
    )


def verdict(loads: Sequence[float], cores: int) -> str:
    """One line for the output and BENCHMARKS.md: the load range and, above the threshold, NOISY."""
    lo, hi = min(loads), max(loads)
    mark = "NOISY" if is_noisy(loads, cores) else "quiet"
    return f"{mark}: load {lo:.1f}-{hi:.1f} on {cores} cores (noisy above {NOISY_LOAD_PER_CORE * cores:.1f})"


def format_ratio(name: str, r: dict) -> str:
    per_round = "/".join(f"{x:.2f}" for x in r["paired"])
    return (
        f"{name}: {r['best']:.2f}x best, {r['paired_median']:.2f}x median of per-round ratios ({per_round}), "
        f"{r['cpu_best']:.2f}x CPU time"
    )


class Bench:
    """One benchmark run: the machine, every load reading, every round's times, and the ratios shown."""

    def __init__(self, threads: dict[str, int] | None = None) -> None:
        self.machine = machine(threads)
        self.loads = [load()]
        self.rows: dict[str, dict] = {}
        self.ratios: dict[str, dict] = {}
        threads_text = ", ".join(f"{k} {v} threads" for k, v in self.machine["threads"].items())
        print(
            f"{self.machine['cpu']}, {self.machine['cores']} cores ({self.machine['cores_used']} used)"
            + (f", {threads_text}" if threads_text else "")
            + f"; load {self.loads[0]:.1f}"
        )

    def note_load(self) -> float:
        self.loads.append(load())
        return self.loads[-1]

    def rounds(self, variants: dict[str, Callable[[], object]], iters: int) -> dict[str, dict]:
        """`iters` interleaved rounds of every variant; wall and CPU seconds of each call, load around each round."""
        wall = {name: [] for name in variants}
        cpu = {name: [] for name in variants}
        for i in range(iters):
            before = self.note_load()
            for name in round_order(list(variants), i):
                start, start_cpu = time.perf_counter(), cpu_seconds()
                variants[name]()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(cpu_seconds() - start_cpu)
            after = self.note_load()
            steps = ", ".join(f"{n} {t[-1]:.2f}s" for n, t in wall.items())
            print(f"  round {i + 1}/{iters}: {steps}; load {before:.1f} -> {after:.1f}")
        rows = {name: summary(wall[name], cpu[name]) for name in variants}
        self.rows.update(rows)
        return rows

    def show_ratio(self, ours: str, peer: str, name: str | None = None) -> dict:
        """Print and keep peer / ours from the recorded rounds."""
        name = name or f"{peer} / {ours}"
        self.ratios[name] = paired_ratio(self.rows[ours], self.rows[peer])
        print("  " + format_ratio(name, self.ratios[name]))
        return self.ratios[name]

    def result(self) -> dict:
        return dict(
            machine=self.machine,
            loads=self.loads,
            noisy=is_noisy(self.loads, self.machine["cores"]),
            verdict=verdict(self.loads, self.machine["cores"]),
            rows=self.rows,
            ratios=self.ratios,
        )

    def finish(self, out: str | os.PathLike | None = None, extra: dict | None = None) -> dict:
        """Print the verdict (NOISY or quiet, with the load range); write everything to `out` as JSON."""
        self.note_load()
        result = {**self.result(), **(extra or {})}
        print(result["verdict"])
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(result, indent=2, default=str))
        return result
