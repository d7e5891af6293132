"""Joining a multi-process JAX cluster (TPU pod slices, SLURM GPU jobs, several processes on one host).

`initialize` must run before anything touches a device. It calls `jax.distributed.initialize` when the
run is one of several processes: explicitly (`distributed.coordinator_address` in the config), through
`JAX_COORDINATOR_ADDRESS`, or as detected from the environment Cloud TPU (several workers in
`TPU_WORKER_HOSTNAMES`) or SLURM (`SLURM_NTASKS` > 1) provides; a single process does nothing.
"""

from __future__ import annotations

import os

import jax
from ml_collections import ConfigDict

from bidirlm_jax.errors import ConfigError


def _launched_as_cluster() -> bool:
    tpu_workers = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    return (
        bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
        or len(tpu_workers) > 1
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
    )


def initialize(dist: ConfigDict) -> None:
    """Join the cluster the config or the environment describes (no-op for a lone process)."""
    if jax.distributed.is_initialized():
        return
    explicit = bool(dist.coordinator_address)
    if not explicit and not _launched_as_cluster():
        return
    if explicit and (dist.num_processes <= 0 or dist.process_id < 0):
        raise ConfigError(
            "distributed.coordinator_address needs distributed.num_processes (> 0) and distributed.process_id (>= 0)"
        )
    # CPU devices of several processes need a collectives backend; the setting only affects CPUs.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(dist.coordinator_address, dist.num_processes, dist.process_id)
    else:
        jax.distributed.initialize()
