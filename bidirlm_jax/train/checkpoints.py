"""Training checkpoints (orbax): train state and a description of the run.

Each step directory holds two items: `state` (params, optimizer state, step, RNG; sharded arrays
written collectively by all processes) and `meta` (JSON: parameter shapes, what defines the data
stream, the run's config). The data position is the step (one global batch per step, see
`data.loader`), so nothing in a checkpoint depends on the process count or the mesh. Saves are
asynchronous and keep the last N; orbax commits a step only when every item is written, so a killed
run never leaves a half checkpoint that resuming would pick up (the temporary directories of such
saves are removed when the next run opens the directory). `meta` lets a resume refuse, by name, a
checkpoint of a different model, of another optimizer layout (what is frozen, clipping), or one that read a
different data stream.

`BestStep` keeps, beside them, the parameters of the step with the best validation score (`RUN/best/`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from bidirlm_jax.errors import CheckpointError, ConfigError
from bidirlm_jax.io.heads import read_best, save_best
from bidirlm_jax.io.run import META_ITEM, STATE_ITEM
from bidirlm_jax.train.state import TrainState


def latest_step(directory: str | os.PathLike) -> int | None:
    """The newest committed step under `directory`, without creating anything."""
    if not Path(directory).is_dir():
        return None
    steps = ocp.utils.checkpoint_steps(directory)  # committed steps only
    return max(steps) if steps else None


def _remove_uncommitted(directory: Path) -> None:
    """Delete the temporary directories of saves a killed run never committed (orbax's own names only)."""
    if directory.is_dir():
        for tmp in ocp.utils.tmp_checkpoints(directory):
            shutil.rmtree(tmp.get(), ignore_errors=True)


class Checkpointer:
    """`params`: the parameters a checkpoint holds (an nnx filter; None: all). A LoRA run saves its adapters and
    head only: its frozen base is rebuilt (`restore`'s `base`) from where the run took it."""

    def __init__(
        self, directory: str | os.PathLike, *, save_every: int, keep: int, params: nnx.filterlib.Filter | None = None
    ):
        self.directory = Path(directory).absolute()
        self._every = save_every
        self._params = params
        if jax.process_index() == 0:
            _remove_uncommitted(self.directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
        self._started: list[int] = []  # saves started and not yet reported committed (`newly_committed`)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(), META_ITEM: ocp.JsonCheckpointHandler()},
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def read_meta(self, step: int) -> dict[str, Any]:
        return self._manager.restore(step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))[META_ITEM]

    def check_resumable(self, step: int, meta: dict[str, Any], *, allow_data_change: bool = False) -> None:
        """Refuse to resume `step` with a run described by `meta` of another model, or of another data
        stream unless `allow_data_change`."""
        saved = self.read_meta(step)
        self._check_model(step, saved.get("param_shapes", {}), meta["param_shapes"])
        self._check_optimizer(step, saved, meta)
        if allow_data_change or "data_stream" not in saved:
            return
        changed = _changes(saved["data_stream"], meta["data_stream"], prefix="data.")
        if changed:
            raise ConfigError(
                f"{self.directory} holds checkpoints (latest step {step}) of a run that read another data stream: "
                f"{'; '.join(changed)}. Resuming would silently continue a different stream. Restore those settings, "
                "use a new --workdir, or pass --config.train.allow_data_change=true to continue on the new data "
                "from the batch of this step"
            )

    def _check_model(self, step: int, saved: dict[str, list[int]], param_shapes: dict[str, list[int]]) -> None:
        if saved == param_shapes:
            return
        missing = sorted(set(param_shapes) - set(saved))
        extra = sorted(set(saved) - set(param_shapes))
        differ = [
            f"{k}: {saved[k]} vs {param_shapes[k]}"
            for k in sorted(set(saved) & set(param_shapes))
            if saved[k] != param_shapes[k]
        ]
        detail = "; ".join(
            part
            for part in (
                f"shapes differ ({', '.join(differ[:3])})" if differ else "",
                f"checkpoint lacks {missing[:3]}" if missing else "",
                f"checkpoint has extra {extra[:3]}" if extra else "",
            )
            if part
        )
        stacked = [
            any(k.startswith("layers/") and not k.split("/")[1].isdigit() for k in d) for d in (saved, param_shapes)
        ]
        if stacked[0] != stacked[1]:
            detail = f"they were written with model.scan_layers={stacked[0]}, the config says {stacked[1]}"
        raise CheckpointError(
            f"{self.directory} holds checkpoints (latest step {step}) of a different model than the config "
            f"describes: {detail}. Use a new --workdir, or the config that wrote these checkpoints"
        )

    def _check_optimizer(self, step: int, saved: dict[str, Any], meta: dict[str, Any]) -> None:
        """The optimizer state's layout (`state.optimizer_layout`; checkpoints older than it, or a `meta`
        without it, are not checked here, and a mismatch then fails in `restore`)."""
        before, now = saved.get("optimizer"), meta.get("optimizer")
        if before is None or now is None or before == now:
            return
        gained = sorted(set(now["trained"]) - set(before["trained"]))
        lost = sorted(set(before["trained"]) - set(now["trained"]))
        parts = [f"this config also trains {_some(gained)}"] if gained else []
        parts += [f"it no longer trains {_some(lost)}"] if lost else []
        settings = _changed_settings(saved.get("config", {}), meta.get("config", {}))
        if not parts and not settings:  # same parameters and settings: a library's tree layout moved; restore decides
            return
        parts += [f"changed: {'; '.join(settings)}"] if settings else []
        raise ConfigError(
            f"{self.directory} holds checkpoints (latest step {step}) whose optimizer state has another layout than "
            f"this config gives: {', '.join(parts)}. Frozen parameters hold no "
            "optimizer state (optim.frozen / optim.trainable, contrastive.train_towers, finetune.train_towers, "
            "lora.*), and settings such as optim.grad_clip_norm add or drop parts of it. Restore the settings that "
            "wrote these checkpoints, or use a new --workdir"
        )

    def kept(self, params: nnx.State) -> nnx.State:
        """The parameters a checkpoint holds (the best step keeps the same)."""
        return params if self._params is None else nnx.split_state(params, self._params, ...)[0]

    def _saved(self, state: TrainState) -> TrainState:
        return state.replace(params=self.kept(state.params))

    def restore(self, step: int, abstract: TrainState, base: TrainState | None = None) -> TrainState:
        """The state at `step`, in `abstract`'s shardings (any mesh, any process count); with `params`, the
        parameters the checkpoint does not hold are `base`'s."""
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(self._saved(abstract))})
        try:
            restored = self._manager.restore(step, args=args)[STATE_ITEM]
            if self._params is None:
                return restored
            rest = nnx.split_state(base.params, self._params, ...)[1]
            return restored.replace(params=nnx.merge_state(restored.params, rest))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"cannot resume from step {step} in {self.directory}: its train state does not fit the configured one "
                f"(optimizer settings such as optim.grad_clip_norm change its structure): {_headline(e)}. Resume with "
                "the settings that wrote it, or use a new --workdir"
            ) from None

    def due(self, step: int) -> bool:
        """Whether `step` is a multiple of the save interval."""
        return step % self._every == 0

    def save(
        self,
        step: int,
        state: TrainState,
        meta: dict[str, Any],
        *,
        force: bool = False,
    ) -> bool:
        """Start an asynchronous save if one is `due` (or `force`); True if one started."""
        if not (force or self.due(step)):
            return False
        saved = ocp.args.StandardSave(self._saved(state))
        args = ocp.args.Composite(**{STATE_ITEM: saved, META_ITEM: ocp.args.JsonSave(meta)})
        started = self._manager.save(step, args=args, force=True)
        if started:
            self._started.append(step)
        return started

    def newly_committed(self) -> list[int]:
        """The steps whose saves have committed since the last call (a save starts only once the one before
        it has committed, so only the newest can still be in flight)."""
        done = self._started if not self._manager.is_saving_in_progress() else self._started[:-1]
        self._started = self._started[len(done) :]
        return done

    def wait(self) -> None:
        """Block until pending saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def is_better(value: float, best: float | None) -> bool:
    """Whether a validation value beats the best so far (higher is better; NaN never wins)."""
    return not math.isnan(value) and (best is None or value > best)


class BestStep:
    """The parameters of the step whose validation `metric` is highest, kept in `RUN/best/`
    (`io.heads.save_best`); a resumed run starts from the best score its earlier part recorded."""

    def __init__(self, workdir: Path, metric: str):
        self._workdir, self.metric = workdir, metric
        best = read_best(workdir)
        self.value: float | None = best["metrics"].get(metric) if best else None

    def offer(self, step: int, params: nnx.State, scores: dict[str, float]) -> bool:
        """Keep `params` if `scores[metric]` beats the best so far (every process calls this: a collective
        save); True if kept."""
        if not is_better(scores[self.metric], self.value):
            return False
        self.value = scores[self.metric]
        save_best(self._workdir, params, step=step, metrics=scores)
        return True


def _some(paths: list[str], shown: int = 3) -> str:
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return ", ".join(paths[:shown]) + more


def _flat(tree: Any, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """A run's config as `{"optim.frozen": [...], ...}`."""
    if not isinstance(tree, dict):
        return {".".join(prefix): tree}
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, (*prefix, str(key))).items()}


def _changed_settings(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`key: old -> new` for the settings that shape the optimizer state (the optimizer, LoRA, `train_towers`)."""
    old, new = (
        {k: v for k, v in _flat(c).items() if k.startswith(("optim.", "lora.")) or k.endswith(".train_towers")}
        for c in (before, now)
    )
    return _changes(old, new)


def _changes(before: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """`prefix+key: old -> new` (JSON values) for every key whose value differs between two flat dicts."""
    keys = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    return [f"{prefix}{k}: {json.dumps(before.get(k))} -> {json.dumps(now.get(k))}" for k in keys]


def _headline(error: Exception, lines: int = 4) -> str:
    """An orbax restore error without the trees it prints (kilobytes of shapes): its unindented lines."""
    kept = [line for line in str(error).splitlines() if line.strip() and not line[0].isspace()]
    return " ".join(kept[:lines]) + (" ..." if len(kept) > lines else "")
