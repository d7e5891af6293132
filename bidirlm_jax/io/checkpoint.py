"""The project's own parameter checkpoints: `config.json` (transformers format) + orbax `params/`, and
training runs read as checkpoints (their latest step's parameters, `model/config.json`).

Orbax writes each array shard from the process that holds it and restores straight into a target
sharding, so on a pod no host ever gathers the whole model; the HF format is for exchange. The
checkpoint's config.json records the dtype(s) its source stored (`dtype`, plus `bidirlm_tensor_dtypes`
for tensors stored otherwise), which an HF export of it defaults to; its parameters are the model's.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from bidirlm_jax import sharding
from bidirlm_jax.errors import CheckpointError
from bidirlm_jax.io.atomic import atomic_directory
from bidirlm_jax.io.companions import Companions
from bidirlm_jax.io.hf_config import TENSOR_DTYPES_KEY, read_config_dict, runtime_from_hf
from bidirlm_jax.io.model_types import described_type, model_type_of
from bidirlm_jax.io.run import (
    HEAD_FILE,
    checkpoints_dir,
    description_dir,
    is_training_run,
    lora_file,
    meta_dir,
    state_dir,
)
from bidirlm_jax.io.sources import PARAMS_DIR, is_checkpoint
from bidirlm_jax.models.runtime import Runtime
from bidirlm_jax.paths import user_path


def save_checkpoint(
    model: nnx.Module,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    extra_files: Companions | None = None,
    dtype: str | None = None,
    tensor_dtypes: Mapping[str, str] | None = None,
) -> Path:
    """Write params and config (plus `extra_files`: `companion_files(src)`) as one atomic directory.

    `dtype`/`tensor_dtypes` (default: the parameters' dtype) record what the source stored, as
    `save_pretrained` takes them. In a multi-process run every process calls this: orbax writes each
    process's shards into one agreed temporary directory, which process 0 renames into place.
    """
    kind = model_type_of(model)
    model = kind.relayout(model, False)  # the per-layer layout, whichever way the model runs
    dtype = dtype or model.runtime.param_dtype
    hf = kind.write(model.config, model.runtime, dtype=dtype)
    exceptions = {k: v for k, v in (tensor_dtypes or {}).items() if v != dtype}
    if exceptions:
        hf[TENSOR_DTYPES_KEY] = dict(sorted(exceptions.items()))
    with atomic_directory(out_dir, overwrite=overwrite, collective=True) as tmp:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp.resolve() / PARAMS_DIR, nnx.state(model, nnx.Param))
        checkpointer.wait_until_finished()
        if jax.process_index() == 0:
            if extra_files is not None:
                extra_files.copy_into(tmp)
            (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return Path(out_dir)


def recorded_dtypes(path: str | os.PathLike) -> tuple[str | None, dict[str, str]]:
    """The source dtypes a checkpoint recorded: (`dtype`, per-tensor exceptions), for `save_pretrained`."""
    config_path = description_dir(path) / "config.json"
    try:
        d = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {config_path}: {e}") from e
    return d.get("dtype") or d.get("torch_dtype"), dict(d.get(TENSOR_DTYPES_KEY) or {})


def load_checkpoint(
    path: str | os.PathLike,
    config: Any = None,
    runtime: Runtime | None = None,
    *,
    mesh: Mesh | None = None,
) -> nnx.Module:
    """Restore a model of `config` (default: the checkpoint's; or the text config of a vision model's
    checkpoint, whose text backbone alone is then read), run as `runtime` says (default: the run settings
    its config.json records).

    A training run gives the parameters of its latest committed step (only they are read, not the
    optimizer state)."""
    path = user_path(path).resolve()
    if not is_checkpoint(path):
        raise CheckpointError(f"{path} is not a bidirlm checkpoint (expected config.json and {PARAMS_DIR}/)")
    if (description_dir(path) / HEAD_FILE).is_file():
        raise CheckpointError(
            f"{path} is a fine-tuning run (an encoder with a task head): load it with "
            "bidirlm_jax.io.heads.load_finetuned, or export it with `bidirlm export`"
        )
    if is_training_run(path) and lora_file(path).is_file():
        raise CheckpointError(
            f"{path} is a LoRA run: its checkpoints hold the adapters, not the model. from_pretrained reads it "
            "(its base with the adapters merged); to convert or merge it, export it first (`bidirlm export RUN DIR`)"
        )
    d = read_config_dict(description_dir(path))
    stored = described_type(d)
    config = config or stored.read(d)
    kind = model_type_of(config)
    runtime = runtime or runtime_from_hf(d)
    wanted = runtime.scan_layers
    # A training run's checkpoints hold the layout it trained with; exchange checkpoints hold one per layer.
    where = state_dir(path, latest_step(path)) if is_training_run(path) else path / PARAMS_DIR
    runtime = runtime.replace(scan_layers=is_training_run(path) and _stacked(where))
    graphdef, abstract = kind.abstract(config, runtime)
    part = "text" if stored is not kind else None  # a tower model's text backbone, alone
    fewer = part is None and config != stored.read(d)  # fewer towers than stored (an Omni model without one)

    def target(var: nnx.Variable):
        placement = (
            sharding.variable_sharding(var, mesh) if mesh is not None else SingleDeviceSharding(jax.devices()[0])
        )
        return var.replace(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=placement))

    abstract = jax.tree.map(target, abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))
    try:
        if is_training_run(path) or part:  # a part of the stored tree: a train state's params, a model's text
            key = "params" if is_training_run(path) else part
            item = {key: abstract}
            args = ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
            )
            state = ocp.PyTreeCheckpointer().restore(where, args=args)[key]
        elif fewer:
            restore = ocp.checkpoint_utils.construct_restore_args(abstract)
            args = ocp.args.PyTreeRestore(item=abstract, restore_args=restore, partial_restore=True)
            state = ocp.PyTreeCheckpointer().restore(where, args=args)
        else:
            state = ocp.StandardCheckpointer().restore(where, abstract)
    except CheckpointError:
        raise
    except Exception as e:  # orbax and tensorstore raise many types (even bare Exception) for a damaged checkpoint
        detail = (str(e).splitlines() or [""])[0][:300]
        raise CheckpointError(
            f"cannot restore {where} ({type(e).__name__}: {detail}); the checkpoint is damaged or "
            "was written for another config — write it again"
        ) from e
    model = kind.relayout(nnx.merge(graphdef, state), wanted)
    return sharding.place(model, mesh) if wanted != runtime.scan_layers else model


def _stacked(state_dir: Path) -> bool:
    """Whether a train state holds its layers stacked (`scan_layers=True`): `params/layers/` (a tower
    model's `params/text/layers/`) then has parameter names, not layer indices."""
    absl = logging.getLogger("absl")  # orbax warns that train states have no step-level metadata file
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        tree = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata
        params = tree["params"]
        return "0" not in params.get("text", params)["layers"]
    except Exception as e:  # orbax raises many types for a damaged or foreign checkpoint
        raise CheckpointError(
            f"cannot read the metadata of {state_dir} ({type(e).__name__}: {e}); write it again"
        ) from e
    finally:
        absl.setLevel(level)


def run_config(run: str | os.PathLike) -> dict:
    """The config a training run trained with (as JSON values), from its latest committed checkpoint."""
    run = user_path(run)
    where = meta_dir(run, latest_step(run))
    try:
        return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(where).get("config") or {}
    except Exception as e:  # orbax raises many types for a damaged checkpoint
        raise CheckpointError(f"cannot read the run config in {where} ({type(e).__name__}: {e})") from e


def latest_step(run: Path) -> int:
    """A training run's newest committed step; refused when it has none."""
    steps = ocp.utils.checkpoint_steps(checkpoints_dir(run))  # committed steps only
    if not steps:
        raise CheckpointError(f"training run {run} has no committed checkpoint yet; train it for more steps first")
    return max(steps)
