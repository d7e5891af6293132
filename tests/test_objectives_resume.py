"""Each objective's run survives a SIGKILL in the middle of an asynchronous save: restarted, its curve equals
an uninterrupted run's bit for bit. (Its own file: three training processes per objective, which the
test workers then share out with the rest of the suite.)"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_objectives import _metrics

INTERRUPTED = str(Path(__file__).with_name("interrupted_train.py"))


def _run(config_file: str, workdir, *overrides, env=None):
    command = [sys.executable, INTERRUPTED, "train", f"--config={config_file}", f"--workdir={workdir}"]
    command += ["--config.metrics.progress_bar=false", "--config.metrics.tensorboard=false", *overrides]
    return subprocess.run(command, env={**os.environ, **(env or {})}, capture_output=True, text=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset",
    ["configs/mntp.py:tiny", "configs/contrastive.py:tiny"],
)
def test_a_run_killed_mid_save_resumes_bit_exactly(preset, tmp_path):
    """SIGKILL while step 8 is being saved, then restart: the curve equals an uninterrupted run's, bit for bit
    (MNTP's masks come from the checkpointed RNG; contrastive batches from the step)."""
    args = ["--config.train.steps=10", "--config.train.checkpoint_every=4", "--config.train.log_every=1"]
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    assert _run(preset, whole, *args).returncode == 0
    killed = _run(preset, interrupted, *args, env={"KILL_SAVE_AT": "8"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = _run(preset, interrupted, *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["loss"] for r in _metrics(interrupted)] == [r["loss"] for r in _metrics(whole)]
