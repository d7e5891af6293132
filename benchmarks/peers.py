"""What the step benchmarks against a PyTorch peer share: one optimizer setting for both sides, memory-analysis
rows and process memory readings (timing rounds and ratios: `measure.py`). (Imported by the scripts beside it;
running it does nothing.)"""

from __future__ import annotations

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
