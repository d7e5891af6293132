"""Run `bidirlm train` on a Cloud TPU VM or pod slice: create, install, train, watch, resume, delete.

    .venv/bin/python launch/tpu/launch.py up NAME --zone ZONE --accelerator v5p-128 --spot --watch \\
        -- --config configs/mntp.py:qwen3-0.6b --workdir gs://BUCKET/runs/q06 [--config.key=value ...]

`up` validates the config here first, with the engine's own start checks for the slice's device count (a
bad value, key, mesh or batch split, a missing tokenizer or data path, an input path the workers would not
have: exit 2 before any cloud command), then: creates the TPU VM (single host) or a queued resource (pod slices, spot), waits for it,
ships the working tree (or `git clone`s `--git-url`), installs the pinned packages with `jax[tpu]` on
every worker, mounts the `gs://` buckets the arguments name (gcsfuse), and starts the same
`bidirlm train` on every worker, detached, one log per worker. `--watch` then polls: a preempted or
deleted slice is recreated and the same command rerun, which resumes from the latest checkpoint in the
workdir. `--dry-run` prints every command instead of running it. `status`, `logs`, `stop` (SIGTERM: a
checkpoint, then exit) and `delete` act on a running slice. The runbook is launch/tpu/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import re
import shlex
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REMOTE_DIR = "bidirlm-jax"  # the project's directory on every worker, under the home directory
REMOTE_TARBALL = "bidirlm-jax.tar.gz"
WORKER_SH = "launch/tpu/worker.sh"
COORDINATOR_PORT = 8482  # the port jax.distributed uses on Cloud TPU
TRAIN_BIN = ".venv/bin/bidirlm"
DEFAULT_ENV = ("PYTHONUNBUFFERED=1",)
STATUS_PREFIX = "bidirlm-status:"


class LaunchError(Exception):
    """A failure the user can fix; `exit_code` 2 for bad input (nothing was run), 1 for a failed run."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------------------------------------- slices


@dataclasses.dataclass(frozen=True)
class Family:
    gcloud_prefix: str  # the accelerator type gcloud takes: PREFIX-N
    cores_per_chip: int  # what N counts: TensorCores (v4, v5p) or chips (v5e, v6e)
    single_host_max_chips: int  # slices up to this many chips are one host
    chips_per_host: int  # hosts of larger slices
    runtime_version: str  # the TPU VM image JAX runs on


FAMILIES = {
    "v4": Family("v4", 2, 4, 4, "tpu-ubuntu2204-base"),
    "v5p": Family("v5p", 2, 4, 4, "v2-alpha-tpuv5"),
    "v5e": Family("v5litepod", 1, 8, 4, "v2-alpha-tpuv5-lite"),
    "v6e": Family("v6e", 1, 8, 4, "v2-alpha-tpuv6e"),
}
_ALIASES = {"v5litepod": "v5e"}


@dataclasses.dataclass(frozen=True)
class Slice:
    accelerator_type: str  # as gcloud spells it (v5litepod-8, v5p-128, v6e-256)
    chips: int  # = the devices JAX sees (v4/v5p megacore: one device per chip)
    hosts: int  # = TPU VM workers = `bidirlm train` processes
    runtime_version: str

    @property
    def multi_host(self) -> bool:
        return self.hosts > 1


def parse_slice(name: str) -> Slice:
    """`v5e-8` / `v5litepod-8`, `v6e-256`, `v5p-128`, `v4-32` → what it is (chips, hosts, image)."""
    match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name.strip().lower())
    if not match:
        raise LaunchError(
            f"--accelerator {name!r}: expected FAMILY-SIZE with FAMILY one of v4, v5p, v5e (v5litepod), v6e, e.g. "
            "v5e-8, v6e-8 (single host), v5p-128, v6e-256 (pod slices)"
        )
    family_name = _ALIASES.get(match.group(1), match.group(1))
    family, size = FAMILIES[family_name], int(match.group(2))
    if size <= 0 or size % family.cores_per_chip:
        raise LaunchError(f"--accelerator {name!r}: {family_name} sizes count TensorCores, a multiple of 2")
    chips = size // family.cores_per_chip
    hosts = 1 if chips <= family.single_host_max_chips else chips // family.chips_per_host
    if chips > family.single_host_max_chips and chips % family.chips_per_host:
        raise LaunchError(f"--accelerator {name!r}: a pod slice has a multiple of {family.chips_per_host} chips")
    return Slice(f"{family.gcloud_prefix}-{size}", chips, hosts, family.runtime_version)


# ------------------------------------------------------------------------------------------- the config


@dataclasses.dataclass
class TrainPlan:
    """The validated `bidirlm train` arguments, as the workers run them."""

    remote_args: list[str]  # after `bidirlm train`, with gs:// paths rewritten to the gcsfuse mounts
    workdir: str  # as given (gs://...)
    buckets: list[str]  # to mount on every worker
    summary: str


_GS = re.compile(r"gs://([^/;,\s]*)")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")


def _find_flag(args: Sequence[str], name: str) -> tuple[int, str] | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return i, args[i + 1]
        if arg.startswith(name + "="):
            return i, arg.split("=", 1)[1]
    return None


def _replace_flag(args: list[str], name: str, value: str) -> list[str]:
    found = _find_flag(args, name)
    assert found is not None
    i, _ = found
    if args[i] == name:
        return [*args[: i + 1], value, *args[i + 2 :]]
    return [*args[:i], f"{name}={value}", *args[i + 1 :]]


def _shipped(path: Path, repo: Path) -> bool:
    """Whether `path` (inside `repo`) travels in the tarball: tracked, or untracked and not ignored."""
    rel = path.relative_to(repo).as_posix()
    ignored = subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", rel], capture_output=True)
    tracked = subprocess.run(["git", "-C", str(repo), "ls-files", "--error-unmatch", rel], capture_output=True)
    return tracked.returncode == 0 or ignored.returncode != 0


def _check_reachable(key: str, path: str, repo: Path, check_shipped: bool) -> None:
    """An input the workers can read: in a bucket (gcsfuse-mounted on each), or a path relative to the
    repository root that travels with the code (the workers run from its copy)."""
    if path.startswith("gs://"):
        return
    local = (repo / path).resolve()
    in_repo = not Path(path).is_absolute() and local.is_relative_to(repo.resolve()) and local.exists()
    if in_repo and (not check_shipped or _shipped(local, repo)):
        return
    raise LaunchError(
        f"--config.{key}={path} is a path on this machine, which the TPU workers do not have; put it in a bucket "
        "(gs://BUCKET/...: every worker mounts it) or in the repository (a path relative to its root is shipped "
        "with the code), or pass --allow-local-inputs if every worker has this path (a shared mount, an image)"
    )


def validate_train_args(
    train_args: Sequence[str],
    slice_: Slice,
    *,
    mount_root: str = "/mnt/gcs",
    allow_local_workdir: bool = False,
    allow_local_inputs: bool = False,
    check_shipped: bool = True,
    repo: Path = REPO,
) -> TrainPlan:
    """Check the `bidirlm train` arguments here, as the engine will on the workers (`train.preflight`, for
    this slice's device count), and refuse input paths the workers would not have."""
    args = list(train_args)
    if not args:
        raise LaunchError(
            "give the `bidirlm train` arguments after `--`: -- --config FILE.py:PRESET --workdir gs://..."
        )
    found = _find_flag(args, "--config")
    if found is None:
        raise LaunchError("missing --config configs/FILE.py[:PRESET] after `--`")
    spec = found[1]
    file_part, _, preset = spec.partition(":")
    local_file = Path(file_part).expanduser().resolve()
    if not local_file.is_file():
        raise LaunchError(f"--config {spec}: no file {local_file}")
    try:
        remote_file = local_file.relative_to(repo).as_posix()
    except ValueError:
        raise LaunchError(
            f"--config {spec}: the config file must be inside the repository ({repo}), which is what the workers get"
        ) from None
    if check_shipped and not _shipped(local_file, repo):
        raise LaunchError(f"--config {spec}: {remote_file} is git-ignored, so it is not shipped to the workers")
    if any(re.match(r"^--?(no)?config\.distributed\.", a) for a in args):
        raise LaunchError(
            "drop the --config.distributed.* overrides: on a TPU slice every worker joins the cluster by itself"
        )

    # The engine's own parser and checks: unknown keys, bad values, a config file that does not load.
    local_args = _replace_flag(args, "--config", str(local_file) + (f":{preset}" if preset else ""))
    try:
        from bidirlm_jax.errors import BidirLMError
        from bidirlm_jax.train.config import parse_train_args
        from bidirlm_jax.train.preflight import input_paths, preflight
    except ImportError as e:
        raise LaunchError(f"cannot import bidirlm_jax ({e}); run this with the project's .venv/bin/python") from None
    try:
        config, workdir = parse_train_args(local_args)
    except BidirLMError as e:
        raise LaunchError(f"config: {e}") from None
    except Exception as e:  # the config file is user code
        raise LaunchError(f"config: cannot load --config {spec}: {type(e).__name__}: {e}") from None

    if not workdir.startswith("gs://") and not allow_local_workdir:
        raise LaunchError(
            f"--workdir {workdir}: use a gs:// directory (every worker writes its checkpoint shards there, and it "
            "outlives the TPU VMs); --allow-local-workdir for a shared mount such as Filestore"
        )
    try:
        plan = preflight(config, slice_.chips)
    except BidirLMError as e:
        raise LaunchError(f"config, on {slice_.accelerator_type}'s {slice_.chips} devices: {e}") from None
    if not allow_local_inputs:
        for key, path in input_paths(config):
            _check_reachable(key, path, repo, check_shipped)
    batch = config.data.global_batch_size
    if not any(re.match(r"^--?(no)?config\.metrics\.progress_bar", a) for a in args):
        args.append("--config.metrics.progress_bar=False")  # the logs are files: no carriage-return bars

    remote = _replace_flag(args, "--config", remote_file + (f":{preset}" if preset else ""))
    # The engine reads and writes through the local file system (pathlib, open, np.memmap), so every gs://
    # path (workdir, init_from, data) goes through a gcsfuse mount of its bucket, the same on every worker.
    buckets: list[str] = []
    for bucket in (b for arg in remote for b in _GS.findall(arg)):
        if not _BUCKET.fullmatch(bucket):
            raise LaunchError(f"gs://{bucket}: not a bucket name (lowercase letters, digits, '-', '_', '.')")
        if bucket not in buckets:
            buckets.append(bucket)
    remote = [_GS.sub(lambda m: f"{mount_root.rstrip('/')}/{m.group(1)}", a) for a in remote]
    summary = (
        f"config OK: {remote_file}{':' + preset if preset else ''}, objective {config.objective}, "
        f"{config.train.steps} steps of {batch} x {config.data.seq_len} tokens, "
        f"mesh data={plan.mesh['data']} fsdp={plan.mesh['fsdp']} tensor={plan.mesh['tensor']}, "
        f"{plan.grad_accum_steps} micro-batch(es) of {plan.rows_per_device} rows per device"
    )
    return TrainPlan(remote, workdir, buckets, summary)


# ------------------------------------------------------------------------------------------- packages


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def tpu_packages(repo: Path = REPO) -> list[str]:
    """What a TPU worker installs: the pins of requirements.lock for the package's own dependencies
    (pyproject `dependencies`: no torch, no test or bench tools), `jax` as `jax[tpu]` at the pinned version."""
    deps = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"]
    pins: dict[str, str] = {}
    for line in (repo / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if match := re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line):
            pins[_normalize(match.group(1))] = match.group(2)
    packages = []
    for dep in deps:
        name = _normalize(re.match(r"[A-Za-z0-9_.-]+", dep).group(0))
        spec = f"{name}=={pins[name]}" if name in pins else dep.replace(" ", "")
        if name == "jax":
            spec = spec.replace("jax", "jax[tpu]", 1)
        packages.append(spec)
    return packages


# --------------------------------------------------------------------------------------------- gcloud


@dataclasses.dataclass
class Target:
    name: str
    zone: str
    project: str | None = None
    queued: bool | None = None  # None: not known (delete/status find out)
    ssh_args: tuple[str, ...] = ()  # extra flags of `tpu-vm ssh/scp`, e.g. --tunnel-through-iap

    def _where(self) -> list[str]:
        return ["--zone", self.zone, *(["--project", self.project] if self.project else [])]

    def create(self, slice_: Slice, runtime: str, *, spot: bool, reserved: bool) -> list[str]:
        tier = ["--spot"] if spot else ["--reserved"] if reserved else []
        if self.queued:
            return [
                "gcloud", "compute", "tpus", "queued-resources", "create", self.name, *self._where(),
                "--node-id", self.name, "--accelerator-type", slice_.accelerator_type, "--runtime-version", runtime,
                *tier,
            ]  # fmt: skip
        return [
            "gcloud", "compute", "tpus", "tpu-vm", "create", self.name, *self._where(),
            "--accelerator-type", slice_.accelerator_type, "--version", runtime, *tier,
        ]  # fmt: skip

    def describe(self, queued: bool | None = None) -> list[str]:
        if self.queued if queued is None else queued:
            return ["gcloud", "compute", "tpus", "queued-resources", "describe", self.name, *self._where(),
                    "--format=value(state.state)"]  # fmt: skip
        return ["gcloud", "compute", "tpus", "tpu-vm", "describe", self.name, *self._where(), "--format=value(state)"]

    def delete(self, queued: bool | None = None) -> list[str]:
        if self.queued if queued is None else queued:  # --force: the TPU VM with it
            return ["gcloud", "compute", "tpus", "queued-resources", "delete", self.name, *self._where(),
                    "--force", "--quiet"]  # fmt: skip
        return ["gcloud", "compute", "tpus", "tpu-vm", "delete", self.name, *self._where(), "--quiet"]

    def ssh(self, command: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.name, *self._where(), "--worker=all", "--quiet",
                *self.ssh_args, "--command", command]  # fmt: skip

    def scp(self, local: str, remote: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{self.name}:{remote}", *self._where(),
                "--worker=all", "--quiet", *self.ssh_args]  # fmt: skip


# Resource states (queued resource: state.state; TPU VM: state).
HEALTHY = {"ACTIVE", "READY"}
RECREATE = {"SUSPENDED", "SUSPENDING", "FAILED", "PREEMPTED", "TERMINATED", "GONE"}
GONE = "GONE"


def _q(arg: str) -> str:
    """Shell-quote for a command that is itself single-quoted once more on gcloud's command line: double
    quotes where they are enough, so that the printed command stays readable."""
    quoted = shlex.quote(arg)
    if quoted == arg or re.search(r'[$`"\\!]', arg):
        return quoted
    return f'"{arg}"'


def _join(argv: Sequence[str]) -> str:
    return " ".join(_q(a) for a in argv)


def remote_code_commands(git_url: str | None, git_ref: str) -> str:
    home = f"~/{REMOTE_DIR}"
    if git_url:
        return (
            f"(test -d {home}/.git || git clone --quiet {_q(git_url)} {home}) && cd {home} && "
            f"git fetch --quiet origin {_q(git_ref)} && git checkout --quiet --detach FETCH_HEAD"
        )
    return (
        f"mkdir -p {home} && cd {home} && find . -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {{}} + && "
        f"tar -xzf ~/{REMOTE_TARBALL}"
    )


def remote_setup_command(python: str, packages: Sequence[str], mount_root: str, buckets: Sequence[str]) -> str:
    command = f"cd ~/{REMOTE_DIR} && " + _join(["bash", WORKER_SH, "install", python, *packages])
    if buckets:
        command += " && " + _join(["bash", WORKER_SH, "mount", mount_root, *buckets])
    return command


def remote_start_command(slice_: Slice, env: Sequence[str], remote_args: Sequence[str]) -> str:
    start = ["bash", WORKER_SH, "start"]
    if slice_.multi_host:
        start += ["--coordinator-port", str(COORDINATOR_PORT)]
    train = ["env", *DEFAULT_ENV, *env, TRAIN_BIN, "train", *remote_args]
    return f"cd ~/{REMOTE_DIR} && " + _join([*start, "--", *train])


def remote_worker(*args: str) -> str:
    return f"cd ~/{REMOTE_DIR} && " + _join(["bash", WORKER_SH, *args])


# -------------------------------------------------------------------------------------------- running


class Shell:
    """Runs commands, or (dry run) prints them, one per line, and runs nothing."""

    def __init__(self, dry_run: bool, out=None, err=None):
        self.dry_run = dry_run
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    def note(self, text: str) -> None:
        if self.dry_run:
            print(f"# {text}", file=self.out)
        else:
            stamp = datetime.datetime.now().strftime("%H:%M:%S")
            print(f"[{stamp}] {text}", file=self.err, flush=True)

    def run(self, argv: Sequence[str], *, check: bool = True) -> int:
        if self.dry_run:
            print(shlex.join(argv), file=self.out)
            return 0
        print(f"+ {shlex.join(argv)}", file=self.err, flush=True)
        try:
            rc = subprocess.run(list(argv)).returncode
        except FileNotFoundError:
            raise LaunchError(f"{argv[0]} not found; install the Google Cloud CLI (gcloud)", 1) from None
        if check and rc:
            raise LaunchError(f"failed ({rc}): {shlex.join(argv)}", 1)
        return rc

    def query(self, argv: Sequence[str]) -> subprocess.CompletedProcess:
        """Run a read-only command and capture its output (never in a dry run)."""
        assert not self.dry_run
        try:
            return subprocess.run(list(argv), capture_output=True, text=True)
        except FileNotFoundError:
            raise LaunchError(f"{argv[0]} not found; install the Google Cloud CLI (gcloud)", 1) from None


def resource_state(shell: Shell, target: Target, queued: bool | None = None) -> str:
    """ACTIVE/READY, a transitional state, GONE (not found), or UNKNOWN (gcloud failed otherwise)."""
    result = shell.query(target.describe(queued))
    if result.returncode == 0:
        return result.stdout.strip().upper() or "UNKNOWN"
    if re.search(r"NOT_FOUND|not found|was not found", result.stderr):
        return GONE
    shell.note(f"describe failed: {result.stderr.strip()[-300:]}")
    return "UNKNOWN"


def worker_statuses(shell: Shell, target: Target) -> list[str]:
    result = shell.query(target.ssh(remote_worker("status")))
    return [line.split(STATUS_PREFIX, 1)[1].strip() for line in result.stdout.splitlines() if STATUS_PREFIX in line]


def decide(statuses: Sequence[str], workers: int) -> str:
    """What the watcher does given every worker's `worker.sh status`:
    done (all exited 0), failed (one exited non-zero), restart (a run lost or missing: a VM restarted),
    wait (running, finishing, or not every worker answered)."""
    if any(s.startswith("exited ") and s != "exited 0" for s in statuses):
        return "failed"
    if len(statuses) < workers:
        return "wait"
    if all(s == "exited 0" for s in statuses):
        return "done"
    if any(s in ("lost", "none") for s in statuses):
        return "restart"
    return "wait"


class Launcher:
    def __init__(self, args: argparse.Namespace, shell: Shell):
        self.a = args
        self.shell = shell
        self.slice = parse_slice(args.accelerator)
        self.queued = args.queued if args.queued is not None else (self.slice.multi_host or args.spot)
        self.target = Target(args.name, args.zone, args.project, self.queued, tuple(args.ssh_arg))
        self.runtime = args.runtime_version or self.slice.runtime_version
        self.plan = validate_train_args(
            args.train_args, self.slice, mount_root=args.mount_root,
            allow_local_workdir=args.allow_local_workdir, allow_local_inputs=args.allow_local_inputs,
            check_shipped=not args.git_url,
        )  # fmt: skip
        self.packages = tpu_packages()
        self.tarball = Path(args.tarball or f"/tmp/bidirlm-jax-{args.name}.tar.gz")
        self.healthy_state = "ACTIVE" if self.queued else "READY"
        self.reused = False  # the slice existed and was healthy when `up` started

    # -- the steps
    def header(self) -> None:
        s, a = self.slice, self.a
        kind = "queued resource" if self.queued else "TPU VM"
        tier = "spot" if a.spot else "reserved" if a.reserved else "on-demand"
        self.shell.note(
            f"{a.name}: {s.accelerator_type}, {s.hosts} worker{'s' * (s.hosts > 1)} x {s.chips // s.hosts} chips = "
            f"{s.chips} devices, {kind}, {tier}, zone {a.zone}, runtime {self.runtime}"
        )
        self.shell.note(self.plan.summary)
        self.shell.note(
            f"workdir {self.plan.workdir}" + (f" (gcsfuse at {self.a.mount_root})" if self.plan.buckets else "")
        )

    def create_and_wait(self) -> None:
        shell, t = self.shell, self.target
        if shell.dry_run:
            shell.note(
                f"create (skipped when {t.name} exists and is {self.healthy_state}; deleted first when preempted)"
            )
            shell.run(t.create(self.slice, self.runtime, spot=self.a.spot, reserved=self.a.reserved))
            shell.note(f"wait: every {self.a.poll_seconds:g}s until it prints {self.healthy_state}")
            shell.run(t.describe())
            return
        state = self.slice_state()
        if state == "UNKNOWN":
            raise LaunchError(f"cannot tell whether {t.name} exists (gcloud failed, above); nothing was created", 1)
        if state in HEALTHY:
            shell.note(f"{t.name} exists and is {state}: reused")
            self.reused = True
            return
        if state in RECREATE and state != GONE:
            shell.note(f"{t.name} is {state}: deleting it first")
            self.delete_and_wait()
        if state in RECREATE:
            shell.run(t.create(self.slice, self.runtime, spot=self.a.spot, reserved=self.a.reserved))
        else:
            shell.note(f"{t.name} is {state}: waiting for it")
        self._wait_healthy()

    def slice_state(self) -> str:
        """The resource's state; for a queued resource that is ACTIVE, its TPU VM's when that one is gone or
        preempted (the queued resource can lag behind)."""
        state = resource_state(self.shell, self.target)
        if self.queued and state in HEALTHY:
            node = resource_state(self.shell, self.target, queued=False)
            if node in RECREATE:
                return node
        return state

    def delete_and_wait(self) -> None:
        self.shell.run(self.target.delete(), check=False)
        while resource_state(self.shell, self.target) != GONE:
            time.sleep(self.a.poll_seconds)

    def _wait_healthy(self) -> None:
        last = None
        while True:
            state = self.slice_state()
            if state != last:
                self.shell.note(f"{self.target.name}: {state}")
                last = state
            if state in HEALTHY:
                return
            if state in RECREATE - {"SUSPENDING"}:
                raise LaunchError(f"{self.target.name} is {state} while starting; see launch/tpu/README.md", 1)
            time.sleep(self.a.poll_seconds)

    def pack(self) -> None:
        """The working tree as git sees it (tracked and untracked files, not ignored ones), packed once."""
        if self.a.git_url:
            return
        if self.shell.dry_run:
            self.shell.note(
                f"pack the working tree (git ls-files --cached --others --exclude-standard) -> {self.tarball}"
            )
            return
        listing = subprocess.run(
            ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True, check=True,
        )  # fmt: skip
        files = sorted({f for f in listing.stdout.decode().split("\0") if f and (REPO / f).is_file()})
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True)
        if dirty.stdout.strip():
            self.shell.note("note: the working tree has uncommitted changes; they are shipped as they are")
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for f in files:
                tar.add(REPO / f, arcname=f, recursive=False)
        self.tarball.write_bytes(buffer.getvalue())
        self.shell.note(f"packed {len(files)} files ({len(buffer.getvalue()) >> 10} KiB) -> {self.tarball}")

    def deploy(self) -> None:
        shell, t = self.shell, self.target
        shell.note("code" + (f": git {self.a.git_url} @ {self.a.git_ref}" if self.a.git_url else ""))
        if not self.a.git_url:
            shell.run(t.scp(str(self.tarball), REMOTE_TARBALL))
        shell.run(t.ssh(remote_code_commands(self.a.git_url, self.a.git_ref)))
        shell.note(f"install ({self.a.python} venv, jax[tpu], no torch)" + (" and mount" if self.plan.buckets else ""))
        shell.run(t.ssh(remote_setup_command(self.a.python, self.packages, self.a.mount_root, self.plan.buckets)))

    def start(self) -> None:
        self.shell.note(
            f"train on all {self.slice.hosts} workers, detached; logs in ~/bidirlm-logs/train-HOSTNAME.log"
            + (f"; JAX_COORDINATOR_ADDRESS = worker 0:{COORDINATOR_PORT}" if self.slice.multi_host else "")
        )
        self.shell.run(self.target.ssh(remote_start_command(self.slice, self.a.env, self.plan.remote_args)))

    def up(self) -> int:
        self.header()
        self.pack()
        self.create_and_wait()
        running = self.reused and "running" in worker_statuses(self.shell, self.target)
        if running:  # `up` again on a live run: reattach (replacing its code under it would break it)
            self.shell.note(f"a run is in progress on {self.a.name}: not redeployed nor restarted")
        else:
            self.deploy()
            self.start()
        if not self.a.watch:
            where = f"{self.a.name} --zone {self.a.zone}" + (f" --project {self.a.project}" if self.a.project else "")
            self.shell.note(
                f"follow: launch.py status|logs {where}; TensorBoard: tensorboard --logdir {self.plan.workdir}"
            )
            return 0
        return self.watch()

    # -- supervising
    def watch(self) -> int:
        shell, t = self.shell, self.target
        if shell.dry_run:
            shell.note(f"--watch: every {self.a.poll_seconds:g}s")
            shell.run(t.describe())
            if self.queued:
                shell.note("  and, while ACTIVE, its TPU VM's own state (PREEMPTED shows there first)")
                shell.run(t.describe(queued=False))
            shell.run(t.ssh(remote_worker("status")))
            shell.note("  all workers 'exited 0' -> done" + (", then delete" if self.a.delete_when_done else ""))
            shell.note("  a worker 'exited N' (N > 0) -> stop the others, exit 1 (see launch.py logs)")
            shell.note("  a run 'lost' (the VM restarted) -> stop, then code, install (mounts) and train again")
            shell.note(f"  state {'/'.join(sorted(RECREATE - {GONE}))} or gone (preempted) -> recreate:")
            shell.run(t.delete())
            shell.note(
                f"  then create, wait, code, install, train as above (at most {self.a.max_restarts} restarts); "
                "the run resumes from the latest checkpoint"
            )
            return 0
        restarts, last = 0, ""
        while True:
            time.sleep(self.a.poll_seconds)
            state = self.slice_state()
            if state in RECREATE:
                restarts = self._count_restart(restarts, f"{t.name} is {state} (preempted?)")
                try:
                    if state != GONE:
                        self.delete_and_wait()
                    shell.run(t.create(self.slice, self.runtime, spot=self.a.spot, reserved=self.a.reserved))
                    self._wait_healthy()
                    self.deploy()
                    self.start()
                except LaunchError as e:  # no capacity, a failed ssh: the next poll sees where it stands
                    shell.note(f"{e}; trying again at the next poll")
                continue
            if state not in HEALTHY:
                shell.note(f"{t.name}: {state}")
                continue
            statuses = worker_statuses(shell, t)
            action = decide(statuses, self.slice.hosts)
            summary = ", ".join(f"{statuses.count(s)} {s}" for s in sorted(set(statuses))) or "no answer"
            if summary != last:
                shell.note(f"workers: {summary}")
                last = summary
            if action == "done":
                shell.note(f"training finished on all {self.slice.hosts} workers; workdir {self.plan.workdir}")
                if self.a.delete_when_done:
                    shell.run(t.delete())
                return 0
            if action == "failed":
                shell.note(f"a worker failed ({', '.join(sorted(set(statuses)))}); stopping the others")
                shell.run(t.ssh(remote_worker("stop", "60")), check=False)
                shell.run(t.ssh(remote_worker("logs", "30")), check=False)
                raise LaunchError(f"training failed on {t.name}; the slice is kept (launch.py delete)", 1)
            if action == "restart":
                restarts = self._count_restart(restarts, f"a run is gone on a worker ({', '.join(statuses)})")
                shell.run(t.ssh(remote_worker("stop", "120")), check=False)
                try:
                    self.deploy()  # mounts do not survive a reboot
                    self.start()
                except LaunchError as e:
                    shell.note(f"{e}; trying again at the next poll")

    def _count_restart(self, restarts: int, why: str) -> int:
        if restarts >= self.a.max_restarts:
            raise LaunchError(f"{why}, and --max-restarts {self.a.max_restarts} are used up", 1)
        self.shell.note(f"{why}: restart {restarts + 1}/{self.a.max_restarts}")
        return restarts + 1


# -------------------------------------------------------------------------------- other subcommands


def _target(args: argparse.Namespace) -> Target:
    # queued None: looked up where it matters
    return Target(args.name, args.zone, args.project, args.queued, tuple(args.ssh_arg))


def cmd_delete(args: argparse.Namespace, shell: Shell) -> int:
    t = _target(args)
    if t.queued is not None:
        shell.run(t.delete())
        return 0
    if shell.dry_run:
        shell.note(f"{t.name} is deleted as a queued resource (with its TPU VM) when one exists, else as a TPU VM:")
        shell.run(t.delete(queued=True))
        shell.run(t.delete(queued=False))
        return 0
    queued = resource_state(shell, t, queued=True) != GONE
    shell.run(t.delete(queued=queued))
    return 0


def cmd_status(args: argparse.Namespace, shell: Shell) -> int:
    t = _target(args)
    if shell.dry_run:
        shell.run(t.describe(True if t.queued is None else None))
        shell.run(t.ssh(remote_worker("status")))
        return 0
    if t.queued is None:
        state = resource_state(shell, t, queued=True)
        if state == GONE:
            state = resource_state(shell, t, queued=False)
    else:
        state = resource_state(shell, t)
    print(f"{t.name}: {state}")
    if state in HEALTHY:
        for status in worker_statuses(shell, t):
            print(f"  worker: {status}")
    return 0


def cmd_logs(args: argparse.Namespace, shell: Shell) -> int:
    shell.run(_target(args).ssh(remote_worker("logs", str(args.lines))))
    return 0


def cmd_stop(args: argparse.Namespace, shell: Shell) -> int:
    shell.run(_target(args).ssh(remote_worker("stop", str(args.timeout))))
    return 0


# ----------------------------------------------------------------------------------------------- CLI


def _env_pair(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch.py",
        description="Run `bidirlm train` on Cloud TPU (launch/tpu/README.md). "
        "up NAME ... -- TRAIN ARGS; status|logs|stop|delete NAME --zone ZONE.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("name", help="the TPU (and queued resource) name")
        p.add_argument("--zone", required=True, help="e.g. us-east5-a (v5p, v6e), us-west4-a (v5e)")
        p.add_argument("--project", help="GCP project (default: gcloud's configured one)")
        p.add_argument("--dry-run", action="store_true", help="print every command instead of running it")
        p.add_argument(
            "--queued", action=argparse.BooleanOptionalAction, default=None,
            help="a queued resource (up's default for pod slices and --spot) or a plain TPU VM (others: looked up)",
        )  # fmt: skip
        p.add_argument(
            "--ssh-arg", action="append", default=[], metavar="FLAG",
            help="extra flag for `gcloud compute tpus tpu-vm ssh/scp` (repeat), e.g. --ssh-arg=--tunnel-through-iap",
        )  # fmt: skip

    up = sub.add_parser("up", help="validate, create, install, train (and --watch)")
    common(up)
    up.add_argument("--accelerator", required=True, help="v5e-8, v6e-8 (one host), v5p-128, v6e-256 (pods), ...")
    up.add_argument("--runtime-version", help="TPU VM image (default: the family's: v2-alpha-tpuv5, ...)")
    tier = up.add_mutually_exclusive_group()
    tier.add_argument("--spot", action="store_true", help="spot capacity: cheaper, preemptible (use --watch)")
    tier.add_argument("--reserved", action="store_true", help="from a reservation (queued resources)")
    up.add_argument("--git-url", help="clone this repository on the workers instead of shipping the working tree")
    up.add_argument("--git-ref", default="main", help="with --git-url: branch, tag or commit (default main)")
    up.add_argument("--tarball", help="where to pack the working tree (default /tmp/bidirlm-jax-NAME.tar.gz)")
    up.add_argument("--python", default="python3.11", help="the workers' interpreter for the venv (default python3.11)")
    up.add_argument("--env", action="append", default=[], type=_env_pair, metavar="KEY=VALUE",
                    help="environment of `bidirlm train` on the workers (repeat)")  # fmt: skip
    up.add_argument("--mount-root", default="/mnt/gcs", help="where gs://BUCKET is mounted (default /mnt/gcs)")
    up.add_argument("--allow-local-workdir", action="store_true", help="a non-gs:// workdir (a shared mount)")
    up.add_argument(
        "--allow-local-inputs", action="store_true",
        help="input paths (model.init_from, data.path, data.tokenizer, ...) that every worker has, outside gs://",
    )  # fmt: skip
    up.add_argument("--watch", action="store_true", help="supervise: recreate and resume after preemption")
    up.add_argument("--max-restarts", type=int, default=20, help="with --watch (default 20)")
    up.add_argument("--delete-when-done", action="store_true", help="with --watch: delete the slice at the end")
    up.add_argument("--poll-seconds", type=float, default=120, help="between state checks (default 120)")

    status = sub.add_parser("status", help="the slice's state and every worker's run")
    common(status)
    logs = sub.add_parser("logs", help="the last lines of every worker's log")
    common(logs)
    logs.add_argument("--lines", type=int, default=50)
    stop = sub.add_parser("stop", help="SIGTERM the run on every worker: it checkpoints and exits")
    common(stop)
    stop.add_argument("--timeout", type=int, default=300, help="seconds before SIGKILL (default 300)")
    delete = sub.add_parser("delete", help="delete the slice (and its queued resource)")
    common(delete)
    return parser


def main(argv: Sequence[str] | None = None, *, out=None, err=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, train_args = argv[:i], argv[i + 1 :]
    err = err or sys.stderr
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    args.train_args = train_args
    if args.command != "up" and train_args:
        print(f"error: {args.command} takes no training arguments", file=err)
        return 2
    shell = Shell(args.dry_run, out=out, err=err)
    try:
        if args.command == "up":
            return Launcher(args, shell).up()  # validation happens in Launcher(), before any command
        return {"status": cmd_status, "logs": cmd_logs, "stop": cmd_stop, "delete": cmd_delete}[args.command](
            args, shell
        )
    except LaunchError as e:
        print(f"error: {e}", file=err)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; the slice and its run are left as they are (launch.py status / delete)", file=err)
        return 130


if __name__ == "__main__":
    sys.exit(main())
