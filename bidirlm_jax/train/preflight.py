"""The checks a training config must pass knowing only the device count: config values, the mesh, the
batch's split into micro-batches, the objective and the inputs it needs (a tokenizer, a data path).

The engine runs them first (`train.loop`), before anything is built or written; the TPU launcher runs the
same function for the slice it is about to create (`launch/tpu/launch.py up --dry-run`), so that a config
it calls OK does not fail on the workers for one of these reasons. `input_paths` lists what a run reads
from its file system, for the launcher to refuse what the workers would not have.
"""

from __future__ import annotations

import dataclasses

from ml_collections import ConfigDict

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.sharding import mesh_shape
from bidirlm_jax.train.config import validate
from bidirlm_jax.train.objectives import check_objective
from bidirlm_jax.train.objectives.base import PATH_SOURCES, check_data_path, check_tokenizer


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a run splits over its devices: the mesh's sizes and the micro-batches of each step."""

    mesh: dict[str, int]  # {"data", "fsdp", "tensor"}
    grad_accum_steps: int  # micro-batches per step
    rows_per_device: int  # rows of one micro-batch on one device


def plan_batch(config: ConfigDict, mesh: dict[str, int]) -> Plan:
    """The global batch split into micro-batches over the mesh's batch shards (a pure function: the engine and
    the TPU launcher both call it). With `train.max_rows_per_device`, `train.grad_accum_steps` is raised to
    the fewest micro-batches that keep each device's rows within it (what fits a chip depends on the device
    count: `benchmarks/memory.py`)."""
    batch, accum = config.data.global_batch_size, config.train.grad_accum_steps
    shards = mesh["data"] * mesh["fsdp"]
    limit = config.train.max_rows_per_device
    rule = (
        f"data.global_batch_size={batch} must be train.grad_accum_steps={accum}{' (or more)' if limit else ''} "
        f"micro-batches × {shards} batch shards (mesh.data={mesh['data']} × mesh.fsdp={mesh['fsdp']}) × "
        "rows per device"
    )
    if limit:
        fits = [a for a in range(accum, batch + 1) if batch % (a * shards) == 0 and batch // (a * shards) <= limit]
        if not fits:
            raise ConfigError(
                f"{rule} ≤ train.max_rows_per_device={limit}; no split fits. Use a data.global_batch_size that "
                f"is a multiple of {accum * shards} (at least {accum * shards}), or lower train.grad_accum_steps "
                "(or change the device count)"
            )
        accum = fits[0]
    if batch % (accum * shards):
        raise ConfigError(
            f"{rule}, but {batch} does not split so. Use a data.global_batch_size that is a multiple of "
            f"{accum * shards}, or change train.grad_accum_steps or the mesh"
        )
    return Plan(dict(mesh), accum, batch // (accum * shards))


def preflight(config: ConfigDict, num_devices: int) -> Plan:
    """Check `config` for `num_devices` devices and plan its mesh and micro-batches (`config` is left as it
    is; the engine runs with the plan's `grad_accum_steps`). Raises `ConfigError`."""
    validate(config)
    mesh = mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, num_devices)
    plan = plan_batch(config, mesh)
    check_objective(config.objective)
    check_tokenizer(config)
    check_data_path(config.data)
    return plan


def _entry_paths(spec: str, fields: int) -> list[str]:
    """The paths of `"NAME:PATH;..."` (2 fields) or `"NAME:WEIGHT:PATH;..."` (3) specs."""
    parts = (p.strip().split(":", fields - 1) for p in spec.split(";") if p.strip())
    return [p[-1] for p in parts if len(p) == fields]


def input_paths(config: ConfigDict) -> list[tuple[str, str]]:
    """`(key, path)` of every file or directory the run reads (Hub datasets, `hf:NAME`, excluded)."""
    data = config.data
    found = [("model.init_from", config.model.init_from), ("data.tokenizer", data.tokenizer)]
    if data.source in PATH_SOURCES:
        found += [("data.path", p) for p in (data.path.split(",") if data.source == "pairs" else [data.path])]
    found += [("data.mixture", p) for p in _entry_paths(data.get("mixture", ""), 3)]
    if "mntp" in config:
        found += [("mntp.eval_data", p) for p in _entry_paths(config.mntp.get("eval_data") or "", 2)]
    if "contrastive" in config:
        found.append(("contrastive.instructions", config.contrastive.get("instructions", "")))
    if "finetune" in config:
        found.append(("finetune.validation_path", config.finetune.get("validation_path") or ""))
    for name, spec in config.get("evals", {}).items():  # one path, or "NAME:PATH;..." (held-out sets)
        for part in filter(None, (p.strip() for p in spec.get("data", "").split(";"))):
            label, sep, rest = part.partition(":")
            path = rest if sep and label != "hf" else part
            found += [(f"evals.{name}.data", path)] if path != "auto" else []
    return [(key, path.strip()) for key, path in found if path and path.strip() and not path.startswith("hf:")]
