"""What the step benchmarks against a PyTorch peer share: one optimizer setting for both sides, interleaved
timing rounds, paired ratios, memory-analysis rows and process memory readings. (Imported by the scripts
beside it; running it does nothing.)"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from bidirlm_jax.train.config import base_config
from bidirlm_jax.train.optim import make_optimizer

# Both sides: AdamW, β 0.9/0.95, ε 1e-8, weight decay on matrices only, global grad-norm clipping at 1.0.
OPTIM = dict(learning_rate=3e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0)
GIB = 1024**3


def constant_optimizer():
    """(tx, schedule) of the engine with `OPTIM` at a constant learning rate."""
    optim = base_config().optim
    optim.update(warmup_steps=0, schedule="constant", **OPTIM)
    return make_optimizer(optim, total_steps=1000)


def torch_adamw(params) -> torch.optim.AdamW:
    """`OPTIM` in torch: decay on matrices, none on vectors (our `make_optimizer`'s mask)."""
    params = list(params)
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": OPTIM["weight_decay"]},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ],
        lr=OPTIM["learning_rate"],
        betas=(OPTIM["b1"], OPTIM["b2"]),
        eps=OPTIM["eps"],
    )


def loadavg() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def vm(field: str) -> float:
    """`VmHWM` / `VmRSS` of this process in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1]) * 1024
    return float("nan")


def memory_row(ma) -> dict[str, float]:
    """XLA's compiled memory analysis in GiB."""
    return {
        "temp_gib": ma.temp_size_in_bytes / GIB,
        "argument_gib": ma.argument_size_in_bytes / GIB,
        "output_gib": ma.output_size_in_bytes / GIB,
        "alias_gib": ma.alias_size_in_bytes / GIB,
    }


def interleaved(variants: dict, iters: int) -> dict[str, dict]:
    """`iters` rounds, each variant once per round; wall and process CPU seconds (all threads) of every step."""
    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    for i in range(iters):
        for name, run in variants.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
        steps = ", ".join(f"{n} {t[-1]:.2f}s" for n, t in wall.items())
        print(f"  round {i + 1}/{iters}: {steps}; load {loadavg()}")
    return {
        name: dict(
            best=min(wall[name]),
            median=statistics.median(wall[name]),
            cpu_best=min(cpu[name]),
            cpu_median=statistics.median(cpu[name]),
            times=wall[name],
            cpu_times=cpu[name],
        )
        for name in variants
    }


def ratio(rows: dict, ours: str, peer: str) -> dict[str, float]:
    """peer time / our time: of the best steps, the median of the per-round ratios (both ran in the same
    minute of every round, so this one is the least sensitive to the machine's load), and of the CPU times."""
    paired = [p / o for p, o in zip(rows[peer]["times"], rows[ours]["times"])]
    return dict(
        best=rows[peer]["best"] / rows[ours]["best"],
        paired_median=statistics.median(paired),
        paired=paired,
        cpu_best=rows[peer]["cpu_best"] / rows[ours]["cpu_best"],
    )


def show(ratios: dict[str, dict]) -> None:
    for k, r in ratios.items():
        print(
            f"  {k}: {r['best']:.2f}x (best), {r['paired_median']:.2f}x (median of per-round ratios "
            f"{'/'.join(f'{x:.2f}' for x in r['paired'])}), {r['cpu_best']:.2f}x (CPU time)"
        )
