"""Training checkpoints (orbax): train state, data-iterator position and a description of the run.

Each step directory holds three items: `state` (params, optimizer state, step, RNG; sharded arrays
written collectively by all processes), `data` (each process's grain iterator position) and `meta`
(JSON: parameter shapes and the run's config). Saves are asynchronous and keep the last N; orbax
commits a step only when every item is written, so a killed run never leaves a half checkpoint that
resuming would pick up. `meta` lets a resume refuse a checkpoint of a different model by name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import grain
import orbax.checkpoint as ocp

from bidirlm_jax.errors import CheckpointError
from bidirlm_jax.train.state import TrainState


def latest_step(directory: str | os.PathLike) -> int | None:
    """The newest committed step under `directory`, without creating anything."""
    if not Path(directory).is_dir():
        return None
    steps = ocp.utils.checkpoint_steps(directory)  # committed steps only
    return max(steps) if steps else None


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int):
        self.directory = Path(directory).absolute()
        self._every = save_every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def read_meta(self, step: int) -> dict[str, Any]:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def check_compatible(self, step: int, param_shapes: dict[str, list[int]]) -> None:
        """Refuse to resume a checkpoint whose parameters differ from the configured model's."""
        saved = self.read_meta(step).get("param_shapes", {})
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
        raise CheckpointError(
            f"{self.directory} holds checkpoints (latest step {step}) of a different model than the config "
            f"describes: {detail}. Use a new --workdir, or the config that wrote these checkpoints"
        )

    def restore(self, step: int, abstract: TrainState, iterator: grain.DatasetIterator) -> TrainState:
        """The state at `step`, in `abstract`'s shardings; `iterator` is moved to the saved position."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(iterator)
        )
        try:
            return self._manager.restore(step, args=args)["state"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"cannot resume from step {step} in {self.directory}: its train state does not fit the configured one "
                f"(optimizer settings such as optim.grad_clip_norm change its structure): {e}. Resume with the "
                "settings that wrote it, or use a new --workdir"
            ) from None

    def save(
        self,
        step: int,
        state: TrainState,
        iterator: grain.DatasetIterator,
        meta: dict[str, Any],
        *,
        force: bool = False,
    ) -> bool:
        """Start an asynchronous save if `step` is a multiple of the interval (or `force`); True if one started."""
        if not force and step % self._every:
            return False
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(iterator),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def wait(self) -> None:
        """Block until pending saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
