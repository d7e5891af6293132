"""The tests' own process helpers: a hang fails with a message instead of blocking the suite, and a cluster
whose coordinator port was taken meanwhile starts again on another port."""

import sys

import pytest

from tests import cluster, procs

SLEEP = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]


def test_a_hung_command_fails_with_its_name_and_output():
    with pytest.raises(pytest.fail.Exception, match=r"(?s)did not finish within 2 s.*started"):
        procs.run(SLEEP, timeout=2, capture_output=True, text=True)


def test_a_condition_that_never_holds_fails_by_name():
    with pytest.raises(pytest.fail.Exception, match="the flag did not happen within 0 s"):
        procs.wait_until(lambda: False, timeout=0.2, what="the flag")


def test_hung_cluster_processes_fail_with_a_message():
    with pytest.raises(pytest.fail.Exception, match=r"processes \[0, 1\] still running after 2 s"):
        cluster.run_together([SLEEP, SLEEP], env={}, timeout=2)


def test_one_failure_stops_the_others_at_once():
    fail = [sys.executable, "-c", "raise SystemExit(3)"]
    (code_a, _, _), (code_b, _, _) = cluster.run_together([fail, SLEEP], env={}, timeout=50)
    assert code_a == 3 and code_b != 0  # killed, not waited on for 60 s


def test_a_taken_port_is_retried_on_another(tmp_path):
    """The first attempt's coordinator cannot bind (as jax reports it); the second runs on a new port."""
    ports = []
    script = (
        "import sys, pathlib; marker = pathlib.Path(sys.argv[1]); port = sys.argv[2]\n"
        "if not marker.exists():\n"
        "    marker.write_text(port); sys.exit('Failed to add port to server: No address added')\n"
        "print(port)\n"
    )

    def commands(port):
        ports.append(port)
        return [[sys.executable, "-c", script, str(tmp_path / "first"), str(port)]]

    results = cluster.run_cluster(commands, env={}, timeout=60)
    cluster.check(results)
    assert len(ports) == 2 and results[0][1].strip() == str(ports[1])
    assert all(p in cluster.PORTS for p in ports)

    always = lambda port: [[sys.executable, "-c", "import sys; sys.exit('Failed to start RPC server')"]]
    with pytest.raises(pytest.fail.Exception, match="could not bind a port in 2 attempts"):
        cluster.run_cluster(always, env={}, timeout=60, attempts=2)


def test_every_subprocess_call_in_the_tests_has_a_timeout():
    """So that no new test can hang the suite again: `subprocess.run` / `call` / `check_call` / `check_output`
    and `communicate` carry a `timeout` (or go through `procs.run`, which requires one)."""
    import ast
    from pathlib import Path

    bounded = {"run", "call", "check_call", "check_output", "communicate"}
    unbounded = []
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in bounded):
                continue
            owner = node.func.value
            if node.func.attr != "communicate" and not (isinstance(owner, ast.Name) and owner.id == "subprocess"):
                continue
            if not any(k.arg == "timeout" for k in node.keywords):
                unbounded.append(f"{path.name}:{node.lineno}")
    assert not unbounded, f"subprocess calls without a timeout: {unbounded}"
