"""The project's own parameter checkpoint: `config.json` (transformers format) + orbax `params/`.

Orbax writes each array shard from the process that holds it and restores straight into a target
sharding, so on a pod no host ever gathers the whole model; the HF format is for exchange.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from bidirlm_jax import sharding
from bidirlm_jax.errors import CheckpointError
from bidirlm_jax.io.atomic import atomic_directory
from bidirlm_jax.io.hf_config import config_to_hf, read_config
from bidirlm_jax.models.config import ModelConfig
from bidirlm_jax.models.transformer import Transformer, abstract_model

PARAMS_DIR = "params"


def is_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / PARAMS_DIR).is_dir() and (path / "config.json").is_file()


def save_checkpoint(
    model: Transformer, out_dir: str | os.PathLike, *, overwrite: bool = False, extra_files: Iterable[Path] = ()
) -> Path:
    """Write params and config (plus `extra_files`, e.g. the tokenizer's) as one atomic directory."""
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        for file in extra_files:
            shutil.copy2(file, tmp / Path(file).name)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp.resolve() / PARAMS_DIR, nnx.state(model, nnx.Param))
        checkpointer.wait_until_finished()
        (tmp / "config.json").write_text(
            json.dumps(config_to_hf(model.config, dtype=model.config.param_dtype), indent=2) + "\n"
        )
    return Path(out_dir)


def load_checkpoint(
    path: str | os.PathLike, config: ModelConfig | None = None, *, mesh: Mesh | None = None
) -> Transformer:
    """Restore a model; `config` (default: the checkpoint's) may change how it runs, never its shapes."""
    path = Path(path).resolve()
    if not is_checkpoint(path):
        raise CheckpointError(f"{path} is not a bidirlm checkpoint (expected config.json and {PARAMS_DIR}/)")
    config = config or read_config(path)
    graphdef, abstract = abstract_model(config)

    def target(var: nnx.Variable):
        where = sharding.variable_sharding(var, mesh) if mesh is not None else SingleDeviceSharding(jax.devices()[0])
        return var.replace(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=where))

    abstract = jax.tree.map(target, abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))
    try:
        state = ocp.StandardCheckpointer().restore(path / PARAMS_DIR, abstract)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"cannot restore {path / PARAMS_DIR} for this config: {e}") from e
    return nnx.merge(graphdef, state)
