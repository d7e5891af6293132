"""`bidirlm train` end to end: learning, exact resume after SIGKILL, SIGTERM, non-finite loss, two
processes, init from an HF directory, and inputs it must refuse without writing anything."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bidirlm_jax.cli import main as cli_main
from bidirlm_jax.io.hf_config import config_to_hf

ROOT = Path(__file__).resolve().parents[1]
TINY = f"{ROOT}/configs/lm.py:tiny"
QUIET = ["--config.metrics.progress_bar=False", "--config.metrics.tensorboard=False"]

# Runs the CLI, but SIGKILLs itself right after the checkpoint save call of step KILL_AT (waiting for
# pending saves first, so the run dies with a committed checkpoint behind it and uncheckpointed steps logged).
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from bidirlm_jax import cli
    from bidirlm_jax.train import checkpoints
    save, kill_at = checkpoints.Checkpointer.save, int(os.environ["KILL_AT"])
    def save_or_die(self, step, *args, **kwargs):
        started = save(self, step, *args, **kwargs)
        if step == kill_at:
            self.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return started
    checkpoints.Checkpointer.save = save_or_die
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def _env(devices: int) -> dict[str, str]:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}


def _train_cmd(workdir, *overrides, script=None):
    head = [sys.executable, "-c", script] if script else [sys.executable, "-m", "bidirlm_jax.cli"]
    return [*head, "train", "--config", TINY, "--workdir", str(workdir), *QUIET, *overrides]


def _run(workdir, *overrides, devices=4, script=None, env=None, timeout=300):
    return subprocess.run(
        _train_cmd(workdir, *overrides, script=script),
        env={**_env(devices), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _params(workdir, step) -> list[np.ndarray]:
    """The checkpoint's parameters on one local device, whatever topology wrote them."""
    path = Path(workdir).absolute() / "checkpoints" / str(step) / "state"
    checkpointer = ocp.StandardCheckpointer()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        checkpointer.metadata(path).item_metadata.tree,
    )
    return [np.asarray(x) for x in jax.tree.leaves(checkpointer.restore(path, target)["params"])]


def _snapshot(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")} if path.exists() else {}


STEPS, KILL_AT, EVERY = 12, 8, 6  # checkpoints at 6 and 12; killed after step 8 (7 and 8 logged, not saved)
RUN = ["--config.train.steps=12", "--config.train.log_every=1", "--config.train.checkpoint_every=6"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted run, and one killed with SIGKILL after step 8 and restarted."""
    whole, killed = tmp_path_factory.mktemp("whole"), tmp_path_factory.mktemp("killed")
    first = _run(whole, *RUN)
    assert first.returncode == 0, first.stderr
    dead = _run(killed, *RUN, script=KILLER, env={"KILL_AT": str(KILL_AT)})
    assert dead.returncode == -signal.SIGKILL, dead.stderr
    assert [r["step"] for r in _metrics(killed)] == list(range(1, KILL_AT + 1))
    resumed = _run(killed, *RUN)
    assert resumed.returncode == 0, resumed.stderr
    return whole, killed


@pytest.mark.slow
def test_tiny_run_writes_the_contract_outputs_and_learns(tmp_path):
    result = _run(tmp_path, "--config.metrics.tensorboard=True")  # the full tiny preset: 60 steps
    assert result.returncode == 0, result.stderr
    records = _metrics(tmp_path)
    for key in ("step", "loss", "learning_rate", "grad_norm", "tokens_per_second", "accuracy", "step_seconds"):
        assert all(key in r for r in records), key
    assert records[0]["loss"] > 5.5 and records[-1]["loss"] < records[0]["loss"] - 2.0  # ln(512)=6.2 → ~3
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [20, 40, 60]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(runs):
    whole, killed = runs
    assert [r["loss"] for r in _metrics(killed)] == [r["loss"] for r in _metrics(whole)]  # steps 7, 8 replayed
    assert [r["step"] for r in _metrics(killed)] == list(range(1, STEPS + 1))
    for a, b in zip(_params(whole, STEPS), _params(killed, STEPS), strict=True):
        assert np.array_equal(a, b)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_at_the_step_boundary_and_exits_0(tmp_path):
    proc = subprocess.Popen(
        _train_cmd(
            tmp_path,
            "--config.train.steps=100000",
            "--config.train.log_every=1",
            "--config.train.checkpoint_every=100000",
        ),
        env=_env(1),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    last = _metrics(tmp_path)[-1]["step"]
    assert f"stopped by SIGTERM after step {last}" in stderr
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [str(last)]


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(runs, tmp_path):
    whole, _ = runs
    before = _snapshot(whole / "checkpoints")
    # Continue the finished run for more steps at an absurd learning rate: step 13 blows up the weights.
    result = _run(
        whole, "--config.train.steps=20", "--config.train.checkpoint_every=1", "--config.optim.learning_rate=1e30"
    )
    assert result.returncode == 2
    assert "non-finite" in result.stderr and "Last good checkpoint: step" in result.stderr
    saved = sorted(int(p.name) for p in (whole / "checkpoints").iterdir())
    bad_step = int(result.stderr.split(" at step ")[1].split(";")[0])
    assert saved[-1] == bad_step - 1 and all(np.isfinite(p).all() for p in _params(whole, saved[-1]))
    after = _snapshot(whole / "checkpoints")
    assert all(after[k] == v for k, v in before.items() if k in after)  # earlier checkpoints untouched


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    args = [
        "--config.train.steps=4",
        "--config.optim.warmup_steps=2",
        "--config.train.log_every=1",
        "--config.train.checkpoint_every=4",
    ]
    single = _run(tmp_path / "one", *args, devices=4)
    assert single.returncode == 0, single.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            _train_cmd(
                tmp_path / "two",
                *args,
                f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}",
            ),
            env=_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "accuracy"):
        np.testing.assert_allclose([r[key] for r in two], [r[key] for r in one], atol=1e-5, rtol=0)
    # Gloo and in-process all-reduces sum in different orders (~1e-7); Adam divides by sqrt(v), which
    # turns that into up to ~1e-5 on the odd weight whose gradient is near zero.
    for a, b in zip(_params(tmp_path / "two", 4), _params(tmp_path / "one", 4), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    assert sorted(p.name for p in (tmp_path / "two/checkpoints/4/data").iterdir() if p.suffix == ".json") == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]


@pytest.mark.slow
def test_init_from_an_hf_directory(tmp_path):
    from flax import nnx

    from bidirlm_jax import get_preset, save_pretrained
    from bidirlm_jax.models.transformer import Transformer

    model = Transformer(get_preset("tiny-qwen3"), rngs=nnx.Rngs(7))
    save_pretrained(model, tmp_path / "hf")
    code = cli_main(
        [
            "train",
            "--config",
            TINY,
            "--workdir",
            str(tmp_path / "run"),
            *QUIET,
            "--config.train.steps=1",
            f"--config.model.init_from={tmp_path / 'hf'}",
            "--config.optim.learning_rate=0",
        ]
    )
    assert code == 0
    expected = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    for a, b in zip(_params(tmp_path / "run", 1), expected, strict=True):
        np.testing.assert_array_equal(a, b)  # learning rate 0: the checkpoint holds the loaded weights


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--config.train.stepz=3"], "unknown config key 'train.stepz'"),
        (["--config.mesh.data=3"], "does not divide the 8 available devices"),
        (
            ["--config.data.global_batch_size=12"],
            "does not split into train.grad_accum_steps=1 micro-batches over the 8",
        ),
        (["--config.mesh.fsdp=2", "--config.train.grad_accum_steps=3"], "use a multiple of 24"),
        (["--config.model.init_from=/nonexistent"], "not a Hugging Face checkpoint directory"),
        (["--config.optim.schedule=cosine"], "optim.schedule"),
    ],
)
def test_bad_inputs_fail_clearly_without_writing(tmp_path, capsys, overrides, message):
    workdir = tmp_path / "run"
    assert cli_main(["train", "--config", TINY, "--workdir", str(workdir), *overrides]) == 2
    assert message in capsys.readouterr().err
    assert not workdir.exists()


def test_init_from_a_directory_without_weights_is_refused(tmp_path, capsys):
    from bidirlm_jax import get_preset

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config_to_hf(get_preset("tiny-qwen3"))))
    args = [
        "train",
        "--config",
        TINY,
        "--workdir",
        str(tmp_path / "run"),
        f"--config.model.init_from={tmp_path / 'hf'}",
    ]
    assert cli_main(args) == 2
    assert "no weights" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_workdir_of_another_model_is_refused_untouched(runs, capsys):
    whole, _ = runs
    before = _snapshot(whole)
    assert cli_main(["train", "--config", TINY, "--workdir", str(whole), "--config.model.num_layers=3"]) == 2
    err = capsys.readouterr().err
    assert "holds checkpoints (latest step" in err and "of a different model" in err and "layers/2" in err
    assert _snapshot(whole) == before
