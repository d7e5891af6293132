"""What a run tells its operator: `logging` lines of the `bidirlm_jax.train` logger.

The plan at start (objective, model, mesh, batch split, parameter and token counts), where the run starts
from, a line every `train.log_every` steps (loss, the objective's key metric, tokens/s, MFU, ETA), saved
checkpoints, evaluation scores, and how it ended. TPU workers and `launch/local.sh --processes N` run
without a progress bar, so these lines are what their logs (`launch/tpu/launch.py logs`) show. The attention
kernel chosen for each layer type is logged by `kernels.attention` when the step compiles.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import sys
from collections.abc import Iterator, Mapping

import jax
import tqdm
from ml_collections import ConfigDict

from bidirlm_jax.models.config import ModelConfig
from bidirlm_jax.models.runtime import Runtime

log = logging.getLogger("bidirlm_jax.train")


class _FirstProcess(logging.Filter):
    """Lets through the records of process 0 (and of a process that has not joined a cluster yet)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not jax.distributed.is_initialized() or jax.process_index() == 0


class _Console(logging.Handler):
    """stderr through tqdm, so that a line printed under a progress bar does not tear it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def console_logging(*, all_processes: bool = False) -> Iterator[None]:
    """While open, the package's INFO lines go to stderr (timestamped), from process 0 only unless
    `all_processes`, and not also to the root logger's handler (which orbax's import installs)."""
    package = logging.getLogger("bidirlm_jax")
    handler = _Console()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    if not all_processes:
        handler.addFilter(_FirstProcess())
    level, propagate = package.level, package.propagate
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    package.propagate = False
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(level)
        package.propagate = propagate


def log_plan(
    config: ConfigDict,
    model: ModelConfig,
    run: Runtime,
    mesh_shape: Mapping[str, int],
    *,
    params: int,
    tokens_per_step: int,
    trained: int | None = None,
) -> None:
    """The run as it was decided, before anything is built (`trained`: the parameters the optimizer updates)."""
    data, train = config.data, config.train
    start = f"from {config.model.init_from}" if config.model.init_from else f"random init of {config.model.preset}"
    log.info("plan: objective %s, %d steps, %s", config.objective, train.steps, start)
    kinds = {kind: model.layer_types.count(kind) for kind in dict.fromkeys(model.layer_types)}
    window = f" (sliding window {model.sliding_window}, {run.bidirectional_window})" if model.sliding_window else ""
    log.info(
        "model: %s, %d layers (%s), hidden %d, %d/%d heads, vocab %d, attention %s%s, compute %s, remat %s%s",
        model.family,
        model.num_layers,
        ", ".join(f"{n} {kind}" for kind, n in kinds.items()),
        model.hidden_size,
        model.num_heads,
        model.num_kv_heads,
        model.vocab_size,
        run.attention,
        window,
        run.dtype,
        run.remat,
        ", scanned layers" if run.scan_layers else "",
    )
    if trained is None or trained == params:
        log.info("parameters: %s, all trained (nothing frozen)", f"{params:,}")
    else:
        lora = config.get("lora")
        adapters = f" (LoRA rank {lora.rank} on {', '.join(lora.targets)})" if lora and lora.rank else ""
        log.info(
            "parameters: %s, %s trained%s, %s frozen", f"{params:,}", f"{trained:,}", adapters, f"{params - trained:,}"
        )
    devices, shards = jax.device_count(), mesh_shape["data"] * mesh_shape["fsdp"]
    log.info(
        "mesh: data=%d fsdp=%d tensor=%d over %d %s devices, %d process%s",
        mesh_shape["data"],
        mesh_shape["fsdp"],
        mesh_shape["tensor"],
        devices,
        jax.devices()[0].platform,
        jax.process_count(),
        "es" if jax.process_count() > 1 else "",
    )
    batch, accum = data.global_batch_size, train.grad_accum_steps
    log.info(
        "batch: %d rows of %d tokens in %d micro-batch%s of %d rows (%d rows per batch shard, %d shards); "
        "%s tokens per step, %s over the run",
        batch,
        data.seq_len,
        accum,
        "es" if accum > 1 else "",
        batch // accum,
        batch // accum // shards,
        shards,
        f"{tokens_per_step:,}",
        f"{tokens_per_step * train.steps:,}",
    )
    blocks = f"block q/kv {run.attention_block_q}/{run.attention_block_kv}"
    if run.attention_impl == "auto":
        log.info("attention kernels: auto (%s); each layer type's is logged when the step compiles", blocks)
    else:
        log.info("attention kernels: %s for every layer type (%s)", run.attention_impl, blocks)


def log_start(resume_step: int | None, checkpoints: str) -> None:
    if resume_step is None:
        log.info("starting fresh; checkpoints in %s", checkpoints)
    else:
        log.info("resumed from step %d (%s)", resume_step, checkpoints)


def log_step(step: int, steps: int, metrics: Mapping[str, float | None], key_metric: str) -> None:
    """`step 20/150 | loss 5.1234 | masked_accuracy 0.1234 | lr 1.0e-03 | 2,345 tokens/s | mfu 12.3% | eta 0:01:23`"""
    parts = [f"step {step}/{steps}", f"loss {metrics['loss']:.4f}"]
    if key_metric and metrics.get(key_metric) is not None:
        parts.append(f"{key_metric} {metrics[key_metric]:.4f}")
    parts.append(f"lr {metrics['learning_rate']:.2e}")
    parts.append(f"{metrics['tokens_per_second']:,.0f} tokens/s")
    if metrics.get("mfu") is not None:
        parts.append(f"mfu {100 * metrics['mfu']:.1f}%")
    eta = (steps - step) * metrics["step_seconds"]
    if math.isfinite(eta):
        parts.append(f"eta {datetime.timedelta(seconds=round(eta))}")
    log.info(" | ".join(parts))


def log_eval(step: int, scores: Mapping[str, float]) -> None:
    log.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in sorted(scores.items())))


def log_checkpoint(step: int) -> None:
    log.info("checkpoint %d saved", step)


def log_end(step: int, steps: int, *, stopped_by: str | None, already: bool = False) -> None:
    """How the run ended, and what running the same command again does."""
    if stopped_by:
        how = "Ctrl-C (SIGINT)" if stopped_by == "SIGINT" else stopped_by
        log.info("stopped by %s after step %d; the same command resumes from step %d", how, step, step)
    elif already:
        log.info("finished at step %d: nothing to do (raise --config.train.steps to train further)", step)
    else:
        log.info("finished at step %d of %d", step, steps)


def log_stopped_at_once(step: int, checkpoint: int | None) -> None:
    """A second Ctrl-C: the steps since the last committed checkpoint are lost."""
    if checkpoint is None:
        log.warning("stopped at once after step %d; no checkpoint yet: the same command starts afresh", step)
        return
    lost = f" (the {step - checkpoint} steps since are lost)" if checkpoint < step else ""
    log.warning("stopped at once after step %d; the same command resumes from step %d%s", step, checkpoint, lost)
