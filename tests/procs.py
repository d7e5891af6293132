"""Subprocesses and waits in tests, each bounded: on a loaded machine a hang fails its test with a message
that says what did not finish and what it printed, instead of blocking the suite."""

import os
import shlex
import subprocess
import time
from collections.abc import Callable

import pytest


def jax_env(devices: int) -> dict[str, str]:
    """This environment for a JAX subprocess on `devices` CPU devices (collectives in one order, as in
    conftest). Every program it compiles goes to the shared compilation cache, not only those that took a
    second: a training run also compiles dozens of small ones (orbax's per-shard slices, initialisers),
    which each later run of the same test would compile again. (Tests in the pytest process keep the
    one-second floor: models run op by op there would write hundreds of entries for nothing.)"""
    flags = f"--xla_force_host_platform_device_count={devices} --xla_cpu_enable_concurrency_optimized_scheduler=false"
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def tail(text: str | bytes | None, chars: int = 3000) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-chars:]


def run(command: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(command, timeout=timeout, **kwargs)`; past `timeout` seconds the child is killed and the
    test fails, naming the command and the end of its output."""
    try:
        return subprocess.run(command, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as e:
        pytest.fail(
            f"`{shlex.join(map(str, command))}` did not finish within {timeout:.0f} s; its output so far:\n"
            f"{tail(e.stdout)}\n{tail(e.stderr)}",
            pytrace=False,
        )


def wait(process: subprocess.Popen, *, timeout: float, what: str) -> int:
    """`process.wait(timeout)`, or kill it and fail the test saying `what` did not finish."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"{what} did not finish within {timeout:.0f} s", pytrace=False)


def wait_until(condition: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `condition` until it holds; fail the test if it has not after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:.0f} s", pytrace=False)
        time.sleep(interval)
