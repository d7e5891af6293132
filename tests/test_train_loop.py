"""`bidirlm train` end to end: learning; exact resume after SIGTERM and after a SIGKILL in the middle of
an asynchronous save; a run moving between process counts and meshes; non-finite losses; init from an
HF directory; and inputs it must refuse without writing anything."""

import json
import shutil
import signal
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bidirlm_jax.cli import main as cli_main
from bidirlm_jax.errors import BidirLMError, ConfigError
from bidirlm_jax.io.hf_config import config_to_hf
from bidirlm_jax.losses.causal_lm import causal_lm_loss
from bidirlm_jax.train import parse_train_args, train
from bidirlm_jax.train.checkpoints import latest_step
from bidirlm_jax.train.preflight import plan_batch, preflight
from tests import procs
from tests.cluster import check, run_cluster
from tests.runs import checkpoint_params, metrics_of, saved_steps

ROOT = Path(__file__).resolve().parents[1]
TINY = f"{ROOT}/configs/lm.py:tiny"
QUIET = ["--config.metrics.progress_bar=False", "--config.metrics.tensorboard=False"]
INTERRUPTED = str(Path(__file__).with_name("interrupted_train.py"))  # SIGTERM / SIGKILL at a chosen step


def _train_cmd(workdir, *overrides, interrupted=False):
    head = [sys.executable, INTERRUPTED] if interrupted else [sys.executable, "-m", "bidirlm_jax.cli"]
    return [*head, "train", "--config", TINY, "--workdir", str(workdir), *QUIET, *overrides]


def _run(workdir, *overrides, devices=4, env=None, timeout=300):
    return procs.run(
        _train_cmd(workdir, *overrides, interrupted=bool(env)),
        env={**procs.jax_env(devices), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _snapshot(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")} if path.exists() else {}


STEPS, TERM_AT, KILL_SAVE_AT = 12, 3, 8  # checkpoints every 4 steps
RUN = ["--config.train.steps=12", "--config.train.log_every=1", "--config.train.checkpoint_every=4"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted run, and one interrupted twice: SIGTERM at step 3 (a preemption: checkpoint at
    the step boundary, exit 0), then SIGKILL while the save of step 8 is being written; each time resumed."""
    whole, interrupted = tmp_path_factory.mktemp("whole"), tmp_path_factory.mktemp("interrupted")
    first = _run(whole, *RUN)
    assert first.returncode == 0, first.stderr

    termed = _run(interrupted, *RUN, env={"TERM_AT": str(TERM_AT)})
    assert termed.returncode == 0, termed.stderr
    assert f"stopped by SIGTERM after step {TERM_AT}" in termed.stderr
    assert saved_steps(interrupted) == [TERM_AT]  # saved although no checkpoint was due

    killed = _run(interrupted, *RUN, env={"KILL_SAVE_AT": str(KILL_SAVE_AT)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert latest_step(interrupted / "checkpoints") == 4  # step 8's arrays are written, but never committed
    assert [t.get().name for t in ocp.utils.tmp_checkpoints(interrupted / "checkpoints")] == [
        f"{KILL_SAVE_AT}.orbax-checkpoint-tmp"
    ]
    assert metrics_of(interrupted)[-1]["step"] > KILL_SAVE_AT  # steps past the last commit were logged, then lost

    resumed = _run(interrupted, *RUN)
    assert resumed.returncode == 0, resumed.stderr
    return whole, interrupted


@pytest.mark.slow
def test_tiny_run_writes_the_contract_outputs_and_learns(tmp_path):
    result = _run(tmp_path, "--config.metrics.tensorboard=True")  # the full tiny preset: 60 steps
    assert result.returncode == 0, result.stderr
    records = metrics_of(tmp_path)
    for key in ("step", "loss", "learning_rate", "grad_norm", "tokens_per_second", "accuracy", "step_seconds"):
        assert all(key in r for r in records), key
    assert records[0]["loss"] > 5.5 and records[-1]["loss"] < records[0]["loss"] - 2.0  # ln(512)=6.2 → ~3
    assert saved_steps(tmp_path) == [20, 40, 60]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_interrupted_run_resumes_bit_exactly(runs):
    whole, interrupted = runs
    # Steps 1-3 come from the first start, 4 from the second, 5-12 replayed by the third.
    assert [r["step"] for r in metrics_of(interrupted)] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm", "accuracy", "learning_rate"):
        assert [r[key] for r in metrics_of(interrupted)] == [r[key] for r in metrics_of(whole)], key
    assert saved_steps(interrupted) == [4, 8, 12] and not ocp.utils.tmp_checkpoints(interrupted / "checkpoints")
    for a, b in zip(checkpoint_params(whole, STEPS), checkpoint_params(interrupted, STEPS), strict=True):
        np.testing.assert_array_equal(a, b)


def _cluster(workdir, *overrides, env):
    """Two processes of 4 CPU devices each running one training job."""
    commands = lambda port: [
        _train_cmd(
            workdir,
            *overrides,
            f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={i}",
            interrupted=True,
        )
        for i in range(2)
    ]
    check(run_cluster(commands, {**procs.jax_env(4), **env}))


@pytest.mark.slow
def test_a_run_moves_between_process_counts_and_meshes(runs, tmp_path):
    whole, _ = runs
    # Steps 1-4: two processes, `fsdp` across them (each parameter's embed side split over processes),
    # `tensor` within each.
    _cluster(
        tmp_path, *RUN, "--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=4", env={"TERM_AT": "4"}
    )
    # Steps 5-8: `tensor=8` spans both processes, which hold the same (only) batch shard: both must feed it
    # the whole global batch.
    _cluster(tmp_path, *RUN, "--config.mesh.data=1", "--config.mesh.tensor=8", env={"TERM_AT": "8"})
    # Steps 9-12: one process.
    last = _run(tmp_path, *RUN)
    assert last.returncode == 0, last.stderr
    ours, theirs = metrics_of(tmp_path), metrics_of(whole)
    assert [r["step"] for r in ours] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm", "accuracy"):  # all-reduces sum in another order: ulps, not bits
        np.testing.assert_allclose([r[key] for r in ours], [r[key] for r in theirs], rtol=2e-5, err_msg=key)
    for a, b in zip(checkpoint_params(tmp_path, STEPS), checkpoint_params(whole, STEPS), strict=True):
        # AdamW steps amplify ulp-level gradient differences near its eps (see test_train_step) into the params
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


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
    saved = saved_steps(whole)
    bad_step = int(result.stderr.split(" at step ")[1].split(";")[0])
    assert saved[-1] == bad_step - 1 and all(np.isfinite(p).all() for p in checkpoint_params(whole, saved[-1]))
    after = _snapshot(whole / "checkpoints")
    assert all(after[k] == v for k, v in before.items() if k in after)  # earlier checkpoints untouched


def test_skipping_non_finite_steps_gives_up_after_max_consecutive_skips(tmp_path):
    def nan_loss(model, batch, rng):
        loss, count, metrics = causal_lm_loss(model, batch, rng)
        return loss * jnp.nan, count, metrics

    overrides = ["--config.train.nonfinite=skip", "--config.train.max_consecutive_skips=3"]
    config, workdir = parse_train_args(
        ["--config", TINY, "--workdir", str(tmp_path), *QUIET, *RUN, "--config.train.checkpoint_every=2", *overrides]
    )
    with pytest.raises(BidirLMError, match=r"in 3 steps in a row \(steps 1-3, each skipped\): giving up") as error:
        train(config, workdir, loss_fn=nan_loss)
    assert "Last good checkpoint: step 2" in str(error.value)  # skipped steps leave the params as they were
    assert [(r["step"], r["loss"]) for r in metrics_of(tmp_path)] == [(1, None), (2, None), (3, None)]


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
    for a, b in zip(checkpoint_params(tmp_path / "run", 1), expected, strict=True):
        np.testing.assert_array_equal(a, b)  # learning rate 0: the checkpoint holds the loaded weights


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--config.train.stepz=3"], "unknown config key 'train.stepz'"),
        (["--config.mesh.data=3"], "does not divide the 8 available devices"),
        (
            ["--config.data.global_batch_size=12"],
            "must be train.grad_accum_steps=1 micro-batches × 8 batch shards (mesh.data=8 × mesh.fsdp=1)",
        ),
        (["--config.mesh.fsdp=2", "--config.train.grad_accum_steps=3"], "a multiple of 24"),
        (["--config.model.init_from=/nonexistent"], "not a Hugging Face checkpoint directory"),
        (["--config.optim.schedule=cosine"], "optim.schedule"),
        (["--config.train.max_rows_per_device=-1"], "max_rows_per_device must be 0"),
        (["--workdir=gs://bucket/run"], "mount the bucket (gcsfuse"),
        (["--config.model.attention_impl=flash"], "model.attention_impl='flash' is not one of"),
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
@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["--config.model.num_layers=3"], ["holds checkpoints (latest step", "of a different model", "layers/2"]),
        (
            ["--config.data.global_batch_size=8", "--config.data.seed=1"],
            [
                "of a run that read another data stream",
                "data.global_batch_size: 16 -> 8; data.seed: 0 -> 1",
                "--config.train.allow_data_change=true",
            ],
        ),
        (  # frozen parameters hold no optimizer state: the restore would not fit
            ["--config.optim.frozen=('embedder/.*',)"],
            [
                "whose optimizer state has another layout than this config gives",
                "it no longer trains embedder/embedding",
                'optim.frozen: [] -> ["embedder/.*"]',
            ],
        ),
        (
            ["--config.optim.grad_clip_norm=0"],
            ["whose optimizer state has another layout", "changed: optim.grad_clip_norm: 1.0 -> 0.0"],
        ),
    ],
)
def test_workdir_of_another_model_or_data_stream_is_refused_untouched(runs, capsys, overrides, expected):
    whole, _ = runs
    before = _snapshot(whole)
    assert cli_main(["train", "--config", TINY, "--workdir", str(whole), *QUIET, *RUN, *overrides]) == 2
    err = capsys.readouterr().err
    assert all(part in err for part in expected), err
    assert _snapshot(whole) == before


@pytest.mark.slow
def test_a_checkpoint_without_its_optimizer_layout_fails_in_one_short_line(runs, tmp_path, capsys):
    """Checkpoints written before `meta` recorded the optimizer layout: the restore's mismatch is reported
    without the trees orbax prints (kilobytes of shapes)."""
    whole, _ = runs
    shutil.copytree(whole / "checkpoints", tmp_path / "checkpoints")
    for meta in (tmp_path / "checkpoints").glob("*/meta/metadata"):
        record = json.loads(meta.read_text())
        del record["optimizer"]
        meta.write_text(json.dumps(record))
    args = ["train", "--config", TINY, "--workdir", str(tmp_path), *QUIET, "--config.train.steps=20"]
    assert cli_main([*args, "--config.optim.grad_clip_norm=0"]) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "cannot resume from step" in error[0], error
    assert "tree structures do not match: opt_state:" in error[0] and len(error[0]) < 600, error


@pytest.mark.slow
def test_a_data_change_can_be_allowed(runs, tmp_path):
    whole, _ = runs
    shutil.copytree(whole / "checkpoints", tmp_path / "checkpoints")
    args = ["train", "--config", TINY, "--workdir", str(tmp_path), *QUIET, *RUN, "--config.data.seed=1"]
    assert cli_main([*args, "--config.train.allow_data_change=true"]) == 0  # at train.steps already: no step runs


def test_the_host_waits_only_to_log_save_or_stop(tmp_path, monkeypatch):
    """Steps run ahead of the host: metrics are read every `log_every` steps and before each save, all
    of them, in order."""
    from bidirlm_jax.train import loop

    reads = []
    read = loop._read_metrics
    monkeypatch.setattr(loop, "_read_metrics", lambda outs: reads.append(len(outs)) or read(outs))
    overrides = ["--config.train.steps=10", "--config.train.log_every=4", "--config.train.checkpoint_every=6"]
    config, workdir = parse_train_args(["--config", TINY, "--workdir", str(tmp_path), *QUIET, *overrides])
    train(config, workdir)
    assert reads == [4, 2, 2, 2]  # steps 1-4 (log), 5-6 (save), 7-8 (log), 9-10 (last)
    assert [r["step"] for r in metrics_of(tmp_path)] == [4, 8, 10]
    assert saved_steps(tmp_path) == [6, 10]


def test_several_processes_agree_on_a_preemption_only_at_sync_steps(tmp_path, monkeypatch):
    """With more than one process, the stop flag's all-gather runs only where the host syncs anyway (log,
    save, last step), not every step; a notice another process got at step 5 stops the run at step 6."""
    import types

    from bidirlm_jax.train import loop

    steps_run, polls = [0], []

    def counted(*args, **kwargs):
        step_fn = jit_step(*args, **kwargs)
        return lambda state, batch: steps_run.__setitem__(0, steps_run[0] + 1) or step_fn(state, batch)

    def allgather(flag):  # this process's flag, and another process's: SIGTERM from step 5 on
        polls.append(steps_run[0])
        return np.array([flag, steps_run[0] >= 5])

    jit_step = loop.jit_step
    monkeypatch.setattr(loop, "jit_step", counted)
    monkeypatch.setattr(loop, "multihost_utils", types.SimpleNamespace(process_allgather=allgather))
    monkeypatch.setattr(loop, "jax", types.SimpleNamespace(**{**vars(jax), "process_count": lambda: 2}))
    overrides = ["--config.train.steps=10", "--config.train.log_every=4", "--config.train.checkpoint_every=6"]
    config, workdir = parse_train_args(["--config", TINY, "--workdir", str(tmp_path), *QUIET, *overrides])
    assert train(config, workdir)["preempted"] and steps_run[0] == 6
    assert polls == [4, 4, 6]  # step 4 (log): before reading metrics and after; step 6 (save): stop
    assert saved_steps(tmp_path) == [6]


def test_max_rows_per_device_raises_the_micro_batch_count():
    """16 rows over 8 batch shards = 2 rows per device in one micro-batch; a limit of 1 needs 2 of them."""
    config, _ = parse_train_args(["--config", TINY, "--workdir", "unused", "--config.train.max_rows_per_device=1"])
    mesh = {"data": 8, "fsdp": 1, "tensor": 1}
    plan = plan_batch(config, mesh)
    assert plan.grad_accum_steps == 2 and plan.rows_per_device == 1
    assert config.train.grad_accum_steps == 1  # a pure function: the engine applies the plan, the launcher reports it
    config.train.update(max_rows_per_device=0, grad_accum_steps=1)
    assert plan_batch(config, mesh).grad_accum_steps == 1
    config.data.global_batch_size = 12
    config.train.max_rows_per_device = 4
    with pytest.raises(ConfigError, match=r"8 batch shards .* ≤ train.max_rows_per_device=4; no split fits"):
        plan_batch(config, mesh)


def test_preflight_plans_the_mesh_and_micro_batches_without_changing_the_config():
    config, _ = parse_train_args(["--config", TINY, "--workdir", "unused", "--config.train.max_rows_per_device=1"])
    config.mesh.update(data=-1, fsdp=2, tensor=2)
    before = config.to_json()
    plan = preflight(config, 8)
    assert (plan.mesh, plan.grad_accum_steps, plan.rows_per_device) == ({"data": 2, "fsdp": 2, "tensor": 2}, 4, 1)
    assert config.to_json() == before


def test_the_progress_bar_shows_each_logged_steps_own_loss(tmp_path, monkeypatch):
    """The bar moved on (and was drawn) before a step's metrics were read, so it showed the previous step's loss."""
    import io
    import re

    import tqdm

    from bidirlm_jax.train import metrics

    shown = io.StringIO()  # every redraw, whatever the time between steps
    bar = lambda total, initial, enabled: tqdm.tqdm(total=total, initial=initial, file=shown, mininterval=0, miniters=1)
    monkeypatch.setattr(metrics, "progress_bar", bar)
    config, workdir = parse_train_args(["--config", TINY, "--workdir", str(tmp_path / "run"), *QUIET])
    config.train.update(steps=3, log_every=1)
    train(config, workdir)
    losses = {row["step"]: row["loss"] for row in map(json.loads, (tmp_path / "run" / "metrics.jsonl").open())}
    drawn = re.findall(r"\b(\d)/3 \[[^\]]*loss=([0-9.]+)", shown.getvalue().replace("\r", "\n"))
    assert {int(step) for step, _ in drawn} == {1, 2, 3}, drawn
    for step, loss in drawn:  # printed with 4 decimals: within half a unit of the last one
        assert float(loss) == pytest.approx(losses[int(step)], abs=5e-5), (step, loss, losses)
