"""Each objective's run survives a SIGKILL in the middle of an asynchronous save: the save is never committed,
the restart resumes the last committed step and replays the steps after it, and the finished run equals an
uninterrupted one bit for bit — every logged metric (timings aside), the checkpoints kept, the final
parameters, and for fine-tuning the evaluation schedule, the best step (its scores and parameters), the head
and the label map. (Its own file: three training processes per objective, which the test workers then share
out with the rest of the suite.)"""

import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from bidirlm_jax.io.heads import load_finetuned, read_best
from bidirlm_jax.train.checkpoints import latest_step
from tests import procs
from tests.runs import checkpoint_params, metrics_of, saved_steps

INTERRUPTED = str(Path(__file__).with_name("interrupted_train.py"))
STEPS, EVERY, KILL_SAVE_AT = 10, 4, 8  # checkpoints (and fine-tuning evaluations) at 4, 8 and 10
ARGS = [f"--config.train.steps={STEPS}", f"--config.train.checkpoint_every={EVERY}", "--config.train.log_every=1"]
ESPEAK = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)"
)
TIMINGS = {"step_seconds", "tokens_per_second", "samples_per_second", "mfu"}  # the only metrics allowed to differ


def _run(config_file: str, workdir, *overrides, env=None):
    command = [sys.executable, INTERRUPTED, "train", f"--config={config_file}", f"--workdir={workdir}"]
    command += ["--config.metrics.progress_bar=false", "--config.metrics.tensorboard=false", *overrides]
    # Two devices: the checkpoints stay sharded (over the data axis); each step and save handles 2 shards, not 8.
    env = {**procs.jax_env(2), **(env or {})}
    return procs.run(command, env=env, capture_output=True, text=True, timeout=900)  # a tiny run: ~1 min


def _values(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


def _kill_and_resume(preset: str, tmp_path: Path, *args: str) -> tuple[Path, Path]:
    """An uninterrupted run and one SIGKILLed while saving step 8, then restarted; the kill and the replay
    checked on the way."""
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    first = _run(preset, whole, *ARGS, *args)
    assert first.returncode == 0, first.stderr[-3000:]

    killed = _run(preset, interrupted, *ARGS, *args, env={"KILL_SAVE_AT": str(KILL_SAVE_AT)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert latest_step(interrupted / "checkpoints") == EVERY  # step 8's arrays were written, never committed
    assert [t.get().name for t in ocp.utils.tmp_checkpoints(interrupted / "checkpoints")] == [
        f"{KILL_SAVE_AT}.orbax-checkpoint-tmp"
    ]
    before = metrics_of(interrupted)
    assert before[-1]["step"] >= KILL_SAVE_AT  # steps past the commit were logged: the restart must redo them

    resumed = _run(preset, interrupted, *ARGS, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = metrics_of(interrupted)
    assert [r["step"] for r in after] == list(range(1, STEPS + 1))  # each step once: the lost ones replayed
    assert _values(after[: len(before)]) == _values(before)  # the replayed steps logged what they logged before
    assert any(a != b for a, b in zip(after[EVERY:], before[EVERY:]))  # rewritten by the restart (timings)
    # step 8 was committed again, by the restart, and nothing uncommitted is left
    assert saved_steps(interrupted) == saved_steps(whole) and KILL_SAVE_AT in saved_steps(interrupted)
    assert not ocp.utils.tmp_checkpoints(interrupted / "checkpoints")

    assert _values(after) == _values(metrics_of(whole))  # every metric, bit for bit
    assert {"loss", "learning_rate", "grad_norm"} <= set(after[0]) == set(metrics_of(whole)[0])
    for a, b in zip(checkpoint_params(whole, STEPS), checkpoint_params(interrupted, STEPS), strict=True):
        np.testing.assert_array_equal(a, b)
    return whole, interrupted


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset",
    [
        "configs/mntp.py:tiny",
        "configs/contrastive.py:tiny",
        "configs/contrastive.py:tiny-image",
        pytest.param("configs/contrastive.py:tiny-audio", marks=ESPEAK),
        pytest.param("configs/contrastive.py:tiny-omni", marks=ESPEAK),
    ],
)
def test_a_run_killed_mid_save_resumes_bit_exactly(preset, tmp_path):
    """MNTP's masks come from the checkpointed RNG; contrastive batches (text, image–text, audio–text, or the
    Omni mixture's, each batch's dataset drawn by weight) from the step."""
    _kill_and_resume(preset, tmp_path)


@pytest.mark.slow
def test_a_fine_tuning_run_killed_mid_save_keeps_its_best_step_schedule_and_head(tmp_path):
    whole, interrupted = _kill_and_resume(
        "configs/finetune.py:tiny", tmp_path, f"--config.evals.validation.every={EVERY}"
    )
    evaluated = [r["step"] for r in metrics_of(interrupted) if "eval/accuracy" in r]
    assert evaluated == [4, 8, 10] == [r["step"] for r in metrics_of(whole) if "eval/accuracy" in r]
    assert read_best(interrupted) == read_best(whole) and read_best(whole)["step"] in evaluated
    for name in ("head.json", "config.json", "tokenizer.json"):
        assert (interrupted / "model" / name).read_bytes() == (whole / "model" / name).read_bytes(), name
    (ours, mine), (theirs, yours) = load_finetuned(interrupted), load_finetuned(whole)
    assert mine == yours and mine["labels"] and ours.head_config == theirs.head_config
    for (path, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(ours, nnx.Param)), nnx.to_flat_state(nnx.state(theirs, nnx.Param)), strict=True
    ):
        np.testing.assert_array_equal(a[...], b[...], err_msg=str(path))
