"""When a run joins a multi-process cluster (the real two-process run is in test_train_loop.py)."""

import jax
import pytest
from ml_collections import ConfigDict

from bidirlm_jax import distributed
from bidirlm_jax.errors import ConfigError


def _dist(**kw) -> ConfigDict:
    return ConfigDict({"coordinator_address": "", "num_processes": 0, "process_id": -1, **kw})


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, False),
        ({"SLURM_NTASKS": "1"}, False),
        ({"SLURM_NTASKS": "16"}, True),
        ({"TPU_WORKER_HOSTNAMES": "t1k-w-0"}, False),  # a single-host TPU VM
        ({"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1"}, True),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}, True),
    ],
)
def test_cluster_detection_from_the_environment(monkeypatch, env, expected):
    for key in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert distributed._launched_as_cluster() is expected


def test_a_lone_process_does_not_join_anything(monkeypatch):
    for key in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    distributed.initialize(_dist())
    assert not jax.distributed.is_initialized()


def test_an_explicit_coordinator_needs_the_process_count_and_id():
    with pytest.raises(ConfigError, match="distributed.num_processes"):
        distributed.initialize(_dist(coordinator_address="127.0.0.1:1234", num_processes=2))
