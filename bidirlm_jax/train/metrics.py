"""What a run reports: model FLOPs and MFU, and the writers (progress bar, TensorBoard, metrics.jsonl).

MFU = model FLOPs per step (from the config, not from XLA's cost analysis, so remat's recomputation
does not count as useful work) ÷ step time ÷ peak FLOP/s of all devices. Peaks are dense bf16 figures
per JAX device; CPUs have none, so MFU is only reported there when `metrics.peak_flops_per_device` is set.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import tqdm

from bidirlm_jax.io.atomic import write_atomically
from bidirlm_jax.models.config import SLIDING, ModelConfig
from bidirlm_jax.models.runtime import Runtime

log = logging.getLogger(__name__)

# device_kind prefix -> peak dense bf16 FLOP/s of one JAX device (vendor datasheets).
PEAK_FLOPS: dict[str, float] = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "TPU7x": 2307e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H800": 989e12,
    "NVIDIA B200": 2250e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
}


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: `override` when positive, else the table's longest matching prefix."""
    if override > 0:
        return override
    matches = [k for k in PEAK_FLOPS if device_kind.startswith(k)]
    return PEAK_FLOPS[max(matches, key=len)] if matches else None


def _keys_per_query(config: ModelConfig, runtime: Runtime, layer_type: str, seq_len: int) -> float:
    """Average number of keys a query attends to (the FLOPs a layer's attention really needs)."""
    causal = runtime.attention == "causal"
    if layer_type != SLIDING or (not causal and runtime.bidirectional_window == "none"):
        return (seq_len + 1) / 2 if causal else seq_len
    w = config.sliding_window
    if causal:
        return min(w, (seq_len + 1) / 2)
    return min(seq_len, w + 1 if runtime.bidirectional_window == "half" else 2 * w + 1)


def training_flops_per_token(config: ModelConfig, seq_len: int, *, runtime: Runtime) -> float:
    """Forward + backward FLOPs per token (3 × forward): matmuls, LM head and attention scores/values (as many
    keys as the runtime's attention mode lets each query see)."""
    d, hd = config.hidden_size, config.head_dim
    per_layer = d * hd * (2 * config.num_heads + 2 * config.num_kv_heads) + 3 * d * config.intermediate_size
    forward = 2 * (config.num_layers * per_layer + d * config.vocab_size)
    for layer_type in config.layer_types:
        forward += 4 * config.num_heads * hd * _keys_per_query(config, runtime, layer_type, seq_len)
    return 3.0 * forward


def mfu(flops_per_step: float, step_seconds: float, peak_per_device: float | None, num_devices: int) -> float | None:
    if not peak_per_device or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / (peak_per_device * num_devices)


class MetricsWriter:
    """Process 0 writes TensorBoard scalars and appends one JSON object per logged step to
    `metrics.jsonl`; other processes write nothing."""

    def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled and tensorboard:
            from tensorboardX import SummaryWriter  # imports torch when installed: seconds a run without it saves

            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def drop_after(self, step: int) -> None:
        """Forget records past `step` (a resumed run repeats them) and lines a crash tore mid-write,
        rewriting the file atomically."""
        if not self.enabled or not self.path.exists():
            return
        lines = []
        for line in filter(None, self.path.read_text().splitlines()):
            try:
                record = json.loads(line)
            except ValueError:
                log.warning("dropping an unreadable line of %s (torn by a crash?): %.80s", self.path, line)
                continue
            if isinstance(record, dict) and record.get("step", math.inf) <= step:
                lines.append(line)
        write_atomically(self.path, "".join(line + "\n" for line in lines))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in metrics.items() if v is not None}
        record = {"step": step, **{k: v if math.isfinite(v) else None for k, v in values.items()}}  # JSON has no NaN
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if math.isfinite(v):
                    self._tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def progress_bar(total: int, initial: int, *, enabled: bool) -> tqdm.tqdm:
    """Console progress on process 0 only."""
    return tqdm.tqdm(
        total=total, initial=initial, disable=not enabled or jax.process_index() != 0, unit="step", dynamic_ncols=True
    )
