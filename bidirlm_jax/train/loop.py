"""`train(config, workdir)`: the whole run — validate, build or resume, step, log, checkpoint, stop.

Everything that can reject the inputs (config values, mesh, batch split, `init_from`, a workdir holding
checkpoints of another model or another data stream) runs before the first byte is written. The next
batch is read and placed on the devices while a step runs, and the host waits for the devices only when
it must read metrics: every `train.log_every` steps, before a checkpoint, an evaluation or a preemption
stop. It then reads every step's metrics since the last time, so a non-finite loss is caught before the
state that produced it could be evaluated or checkpointed. A resumed run continues the data stream at the
batch of its step, whatever its process count or mesh (`data.loader`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from ml_collections import ConfigDict

import bidirlm_jax.train.lora as lora_train
import bidirlm_jax.train.metrics as metrics_lib
import bidirlm_jax.train.runlog as runlog
import bidirlm_jax.train.trainable as trainable_lib
from bidirlm_jax import distributed, sharding
from bidirlm_jax.data.loader import DeviceBatches
from bidirlm_jax.errors import BidirLMError, ConfigError
from bidirlm_jax.io.atomic import atomic_directory
from bidirlm_jax.io.model_types import model_type_of
from bidirlm_jax.io.run import checkpoints_dir, model_dir
from bidirlm_jax.models.config import ModelConfig
from bidirlm_jax.models.runtime import Runtime
from bidirlm_jax.sharding import make_mesh
from bidirlm_jax.train.architecture import init_params, model_config, tower_patterns
from bidirlm_jax.train.checkpoints import Checkpointer, latest_step
from bidirlm_jax.train.config import data_stream, run_settings, validate
from bidirlm_jax.train.evaluation import Evaluation, EvaluatorFactory, Schedule, build_evaluations
from bidirlm_jax.train.objectives import LossFn, Objective, build_objective, causal_lm
from bidirlm_jax.train.optim import make_optimizer
from bidirlm_jax.train.preflight import preflight
from bidirlm_jax.train.state import StateLayout, optimizer_layout, param_shapes
from bidirlm_jax.train.step import jit_step, make_step_fn

# objectives that train a model with towers -> the config section whose `train_towers` unfreezes them
TOWER_OBJECTIVES = {"contrastive": "contrastive", "classification": "finetune", "regression": "finetune"}


class _Preemption:
    """SIGTERM (Cloud TPU preemption, SLURM/K8s stop) and, with `ctrl_c`, a first Ctrl-C → finish the step,
    checkpoint, exit cleanly; a second Ctrl-C stops at once (KeyboardInterrupt). All processes agree on
    stopping at the same step. `signal_name` is the first signal's."""

    def __init__(self, *, ctrl_c: bool = False):
        self._flag = False
        self.signal_name: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            signals = (signal.SIGTERM, signal.SIGINT) if ctrl_c else (signal.SIGTERM,)
            self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt
        if signum == signal.SIGINT and jax.process_index() == 0:  # os.write: safe inside a signal handler
            os.write(2, b"\nCtrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again: stop now)\n")
        self.signal_name = self.signal_name or signal.Signals(signum).name
        self._flag = True

    def requested(self, *, sync: bool = True) -> bool:
        """Whether to stop after this step. With several processes they must agree, by an all-gather that
        every one reaches at the same step: only at a `sync` step (the loop waits for the devices there
        anyway), so a notice waits for the next one (at most `train.log_every` steps)."""
        if jax.process_count() == 1:
            return self._flag
        return sync and bool(np.any(multihost_utils.process_allgather(np.asarray(self._flag))))

    def close(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


@dataclasses.dataclass
class _Plan:
    """Everything a run needs, decided and checked before anything is written."""

    mesh: Mesh
    model: ModelConfig
    runtime: Runtime
    layout: StateLayout
    objective: Objective
    step_fn: Any
    batches: DeviceBatches
    resume_step: int | None
    init_params: nnx.State | None
    saved_params: trainable_lib.Filter | None  # what checkpoints hold (LoRA: the trained part; None: all)
    meta: dict[str, Any]
    evaluations: list[Evaluation]


def _plan(
    config: ConfigDict, workdir: Path, loss_fn: LossFn | None, evaluators: Mapping[str, EvaluatorFactory] | None
) -> _Plan:
    validate(config)
    distributed.initialize(config.distributed)
    run_plan = preflight(config, jax.device_count())
    config.train.grad_accum_steps = run_plan.grad_accum_steps  # what the objectives split each batch into
    mesh = make_mesh(**run_plan.mesh)
    model_cfg, runtime = model_config(config.model), run_settings(config.model)
    towers = not isinstance(model_cfg, ModelConfig)
    if towers and (loss_fn is not None or config.objective not in TOWER_OBJECTIVES):
        raise ConfigError(
            f"model.towers trains with objective contrastive (image/audio–text pairs) or classification / regression "
            f"(configs/finetune.py), not {config.objective}; drop model.towers to train the text stack"
        )
    if towers and lora_train.settings(config).enabled:
        raise ConfigError("lora.rank with model.towers: LoRA adapts the text model alone for now; drop one of them")
    if loss_fn is None:
        objective = build_objective(config, model_cfg, workdir=workdir)
    else:
        objective = causal_lm.build(config, model_cfg, workdir=workdir, loss_fn=loss_fn)
    section = config[TOWER_OBJECTIVES.get(config.objective, "contrastive")] if towers else None
    if towers and not section.get("train_towers", False):  # frozen: no update, no optimizer state
        within = "encoder/" if objective.model_factory is not None else ""  # a task head's encoder
        config.optim.frozen = (*config.optim.frozen, *(within + p for p in tower_patterns(model_cfg, runtime)))
    evaluations = build_evaluations(config, objective, evaluators)
    tx, schedule = make_optimizer(config.optim, config.train.steps)
    trainable = trainable_lib.from_config(config.optim)
    lora = lora_train.settings(config).enabled
    if lora:  # adapters train, the base stays frozen and out of the checkpoints
        objective, trainable = lora_train.adapt(config, objective, model_cfg, runtime)
    layout = StateLayout(
        model_cfg,
        tx,
        mesh,
        seed=config.train.seed,
        runtime=runtime,
        model_factory=objective.model_factory,
        trainable=trainable,
    )
    trainable_lib.check(layout.abstract.params, config.optim)
    meta = {
        "param_shapes": param_shapes(layout.abstract.params),
        "optimizer": optimizer_layout(layout.abstract, trainable),
        "data_stream": data_stream(config.data),
        "config": json.loads(config.to_json_best_effort()),
    }
    resume_step = latest_step(checkpoints_dir(workdir))
    if resume_step is not None:
        existing = Checkpointer(checkpoints_dir(workdir), save_every=1, keep=1)
        try:
            existing.check_resumable(resume_step, meta, allow_data_change=config.train.allow_data_change)
        finally:
            existing.close()
    batches = DeviceBatches(
        objective.rows,
        mesh,
        config.data.global_batch_size,
        start=resume_step or 0,
        read_threads=config.data.read_threads,
        prefetch=config.data.prefetch,
    )
    step_fn = jit_step(
        make_step_fn(
            layout.graphdef,
            objective.grad_fn,
            tx,
            schedule,
            skip_nonfinite=config.train.nonfinite == "skip",
            trainable=trainable,
        ),
        layout.shardings,
        mesh,
    )
    from_hf = config.model.init_from and (resume_step is None or lora)  # a LoRA run's base is never saved
    load_runtime = runtime.replace(param_dtype=lora_train.base_dtype(config)) if lora else runtime
    return _Plan(
        mesh=mesh,
        model=model_cfg,
        runtime=runtime,
        layout=layout,
        objective=objective,
        step_fn=step_fn,
        batches=batches,
        resume_step=resume_step,
        init_params=init_params(config.model, load_runtime, mesh, objective) if from_hf else None,
        saved_params=trainable if lora else None,
        meta=meta,
        evaluations=evaluations,
    )


def _nonfinite_error(
    train: ConfigDict, out: dict[str, float], step: int, skipped: int, checkpointer: Checkpointer
) -> BidirLMError:
    checkpointer.wait()
    good = checkpointer.latest_step()
    where = f"Last good checkpoint: {'step ' + str(good) if good is not None else 'none'} in {checkpointer.directory}"
    cause = f"non-finite loss ({out['loss']}) or gradient norm ({out['grad_norm']})"
    if train.nonfinite == "stop":
        return BidirLMError(
            f"{cause} at step {step}; stopped without saving it. {where}. Lower optim.learning_rate (or raise "
            "optim.warmup_steps), or set --config.train.nonfinite=skip to skip such steps"
        )
    return BidirLMError(
        f"{cause} in {skipped} steps in a row (steps {step - skipped + 1}-{step}, each skipped): giving up, as "
        f"train.max_consecutive_skips={train.max_consecutive_skips} says. {where}. Lower optim.learning_rate (or "
        "raise optim.warmup_steps), check the data, or raise --config.train.max_consecutive_skips"
    )


def _read_metrics(outs: list[dict[str, jax.Array]]) -> list[dict[str, np.ndarray]]:
    """Wait for the devices and bring steps' metrics to the host: the loop's only sync."""
    return jax.device_get(outs)


def _write_model_description(workdir: Path, plan: _Plan) -> None:
    """`WORKDIR/model/`: what `from_pretrained(WORKDIR)` and `bidirlm export` need besides the weights."""
    if (model_dir(workdir) / "config.json").is_file():
        return
    with atomic_directory(model_dir(workdir), collective=True) as tmp:
        if jax.process_index() == 0:
            description = model_type_of(plan.model).write(plan.model, plan.runtime)
            (tmp / "config.json").write_text(json.dumps(description, indent=2) + "\n")
            if plan.objective.tokenizer is not None:
                plan.objective.tokenizer.save_pretrained(tmp)
            for name, text in plan.objective.run_files.items():
                (tmp / name).write_text(text)


def train(
    config: ConfigDict,
    workdir: str,
    *,
    loss_fn: LossFn | None = None,
    ctrl_c_saves: bool = False,
    evaluators: Mapping[str, EvaluatorFactory] | None = None,
) -> dict[str, Any]:
    """Train (or resume from the workdir's latest checkpoint) as `config` says.

    `loss_fn` replaces the causal-LM loss on the causal-LM objective's data (tests, experiments).
    `ctrl_c_saves`: a first Ctrl-C stops the run like SIGTERM, at a checkpoint (`bidirlm train`); otherwise
    it raises KeyboardInterrupt at once, for callers such as the demo that run several phases.
    `evaluators`: the registry of evaluation kinds that `config.evals` entries name (`evals.registry.EVALUATORS`;
    see `train.evaluation`), needed when an entry is on.
    Returns `{"step", "preempted", "stopped_by" (the signal that ended it early), **last logged metrics}`.
    Raises a `BidirLMError` for unusable inputs (before writing anything), when the loss turns non-finite
    with `train.nonfinite="stop"`, and after `train.max_consecutive_skips` non-finite steps in a row with
    `"skip"`.
    """
    with sharding.use_rules(config.mesh.rules):  # the state, the batches and the traced step follow them
        return _train(config, workdir, loss_fn=loss_fn, ctrl_c_saves=ctrl_c_saves, evaluators=evaluators)


def _train(
    config: ConfigDict,
    workdir: str,
    *,
    loss_fn: LossFn | None,
    ctrl_c_saves: bool,
    evaluators: Mapping[str, EvaluatorFactory] | None,
) -> dict[str, Any]:
    if "://" in str(workdir):
        raise ConfigError(
            f"--workdir {workdir}: the engine writes through the local file system; mount the bucket (gcsfuse, as "
            "launch/tpu/launch.py does on every worker) and give the mounted path"
        )
    workdir = Path(workdir)
    plan = _plan(config, workdir, loss_fn, evaluators)
    runlog.log_plan(
        config,
        getattr(plan.model, "text", plan.model),
        plan.runtime,
        dict(plan.mesh.shape),
        params=sum(x.size for x in jax.tree.leaves(plan.layout.abstract.params)),
        trained=sum(
            x.size for x in jax.tree.leaves(trainable_lib.split(plan.layout.abstract.params, plan.layout.trainable)[0])
        ),
        tokens_per_step=plan.objective.tokens_per_step,
    )
    runlog.log_start(plan.resume_step, str(checkpoints_dir(workdir)))
    checkpointer = Checkpointer(
        checkpoints_dir(workdir),
        save_every=config.train.checkpoint_every,
        keep=config.train.keep_checkpoints,
        params=plan.saved_params,
    )
    fresh = None
    if plan.resume_step is None or plan.saved_params is not None:  # a checkpoint without the base: rebuild it
        fresh = plan.layout.from_params(plan.init_params) if plan.init_params is not None else plan.layout.init()
    state = fresh if plan.resume_step is None else checkpointer.restore(plan.resume_step, plan.layout.abstract, fresh)
    _write_model_description(workdir, plan)
    writer = metrics_lib.MetricsWriter(workdir, tensorboard=config.metrics.tensorboard)
    step = int(jax.device_get(state.step))
    writer.drop_after(step)
    objective = plan.objective
    peak = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind, config.metrics.peak_flops_per_device)
    bar = metrics_lib.progress_bar(config.train.steps, step, enabled=config.metrics.progress_bar)
    preemption = _Preemption(ctrl_c=ctrl_c_saves)
    schedule = Schedule(plan.evaluations, workdir, config.train.steps)
    logged: dict[str, Any] = {}
    preempted = interrupted = False
    start = step
    skipped = 0  # non-finite steps in a row (train.nonfinite="skip")
    try:
        with jax.set_mesh(plan.mesh):
            last = time.perf_counter()
            pending: list[tuple[int, dict[str, jax.Array]]] = []  # steps whose metrics the host has not read
            batch = next(plan.batches)
            while step < config.train.steps:
                state, out = plan.step_fn(state, batch)
                step += 1
                pending.append((step, out))
                if step < config.train.steps:
                    batch = next(plan.batches)  # read and placed on the devices while they run the step
                validating = schedule.due(step)
                final = step == config.train.steps
                sync = validating or final or checkpointer.due(step) or step % config.train.log_every == 0
                preempted = preemption.requested(sync=sync)
                if not (preempted or sync):
                    bar.update(1)
                    continue
                # The one host sync: every metric since the last one, before any save or evaluation, so a
                # state that a non-finite step produced is never evaluated or saved.
                outs = _read_metrics([o for _, o in pending])
                seconds = (time.perf_counter() - last) / len(pending)
                for (at, out), raw in zip(pending, outs):
                    out = {k: float(v) for k, v in raw.items()}
                    skipped = 0 if out.pop("finite") else skipped + 1
                    if at == step and validating:  # before the next step, which donates this state
                        model = nnx.merge(plan.layout.graphdef, state.params)
                        out.update(schedule.run(step, model, checkpointer.kept(state.params)))  # as checkpoints
                    evaluated = any(k.startswith("eval/") for k in out)
                    if skipped or evaluated or at % config.train.log_every == 0 or at == config.train.steps:
                        logged = dict(
                            objective.report(out),
                            step_seconds=seconds,
                            tokens_per_second=objective.tokens_per_step / seconds,
                            samples_per_second=config.data.global_batch_size / seconds,
                            mfu=metrics_lib.mfu(objective.flops_per_step, seconds, peak, jax.device_count()),
                        )
                        writer.write(at, logged)
                        runlog.log_step(at, config.train.steps, logged, objective.key_metric)
                        if evaluated:
                            runlog.log_eval(at, {k: v for k, v in out.items() if k.startswith("eval/")})
                        bar.set_postfix(loss=f"{out['loss']:.4f}", lr=f"{out['learning_rate']:.2e}", refresh=False)
                    if skipped and (config.train.nonfinite == "stop" or skipped >= config.train.max_consecutive_skips):
                        raise _nonfinite_error(config.train, out, at, skipped, checkpointer)
                pending.clear()
                bar.update(1)  # after the postfix: the bar never shows a step with the previous step's loss
                preempted = preempted or preemption.requested()  # a notice that came while logging
                checkpointer.save(step, state, plan.meta, force=preempted or final)
                for saved in checkpointer.newly_committed():
                    runlog.log_checkpoint(saved)
                last = time.perf_counter()  # evaluation and saving are not a step's time
                if preempted:
                    break
        checkpointer.wait()
        for saved in checkpointer.newly_committed():
            runlog.log_checkpoint(saved)
        stopped_by = (preemption.signal_name or "another process's signal") if preempted else None
        stopped_by = stopped_by if step < config.train.steps else None
        runlog.log_end(step, config.train.steps, stopped_by=stopped_by, already=start >= config.train.steps)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        preemption.close()
        bar.close()
        writer.close()
        checkpointer.close()
        if interrupted:
            runlog.log_stopped_at_once(step, latest_step(checkpointer.directory))
    return {"step": step, "preempted": preempted, "stopped_by": stopped_by, **logged}
