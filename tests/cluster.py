"""Several processes of one JAX cluster on this machine, for the multi-process tests (gloo on CPU).

A free port can only be found by binding it and letting it go, so another program may take it before the
coordinator binds it: ports are drawn below the kernel's ephemeral range (where outgoing connections do not
land), and `run_cluster` starts the cluster again on another port when the coordinator could not bind."""

import contextlib
import os
import random
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable

import pytest

from tests.procs import tail

PORTS = range(20_000, 32_000)  # below Linux's ephemeral range (32768-60999 by default)
PORT_TAKEN = re.compile(r"Failed to add port|Failed to start RPC server|address already in use|EADDRINUSE", re.I)


def free_port() -> int:
    """A port nothing holds now on any IPv4 interface (the coordinator binds them all)."""
    for port in random.sample(PORTS, 200):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {PORTS}")


def run_together(commands: list[list[str]], env: dict[str, str], timeout: float = 300) -> list[tuple[int, str, str]]:
    """Start every command at once (one per process), wait for all: [(returncode, stdout, stderr)]. When one
    fails, the others (which would wait for it in a collective) are stopped; past `timeout` seconds the test
    fails, naming the processes still running and their last output."""
    with contextlib.ExitStack() as files:
        outs = [tuple(files.enter_context(tempfile.TemporaryFile("w+")) for _ in "oe") for _ in commands]
        procs = [
            subprocess.Popen(cmd, env={**os.environ, **env}, stdout=o, stderr=e, text=True)
            for cmd, (o, e) in zip(commands, outs)
        ]
        try:
            _wait_for_all(procs, timeout, lambda i: _read(outs[i][1]))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
        return [(p.returncode, _read(o), _read(e)) for p, (o, e) in zip(procs, outs)]


def _read(f) -> str:
    f.seek(0)
    return f.read()


def _wait_for_all(procs: list[subprocess.Popen], timeout: float, stderr: Callable[[int], str]) -> None:
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            return  # one failed: the rest cannot finish without it
        if time.monotonic() > deadline:
            running = [i for i, p in enumerate(procs) if p.poll() is None]
            detail = "\n".join(f"process {i}: {tail(stderr(i))}" for i in running)
            pytest.fail(f"processes {running} still running after {timeout:.0f} s (a hang?):\n{detail}")
        time.sleep(0.1)


def run_cluster(
    commands: Callable[[int], list[list[str]]], env: dict[str, str], timeout: float = 300, attempts: int = 3
) -> list[tuple[int, str, str]]:
    """`run_together(commands(port), ...)` on a free coordinator port, again on another one (up to `attempts`
    times) when the coordinator could not bind its port because something took it meanwhile."""
    for _ in range(attempts):
        port = free_port()
        results = run_together(commands(port), env, timeout)
        if not any(code != 0 and PORT_TAKEN.search(err) for code, _, err in results):
            return results
    pytest.fail(f"the coordinator could not bind a port in {attempts} attempts; last error: {tail(results[0][2])}")


def check(results: list[tuple[int, str, str]]) -> None:
    """Every process exited 0; else the failures, each with the end of its stderr."""
    bad = [f"process {i} exited {code}: {tail(err)}" for i, (code, _, err) in enumerate(results) if code != 0]
    assert not bad, "\n".join(bad)
