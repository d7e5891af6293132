"""What `bidirlm train` tells its operator (`train.runlog`): the plan, where it starts, step lines,
checkpoints and how it ended, without a progress bar (as on TPU workers); Ctrl-C saves a checkpoint first."""

import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import pytest
from flax import nnx

from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.models.transformer import abstract_model
from bidirlm_jax.train import loop, runlog
from bidirlm_jax.train.checkpoints import latest_step

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--config.metrics.progress_bar=False", "--config.metrics.tensorboard=False"]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}


def _train(workdir, *overrides) -> list[str]:
    cmd = [sys.executable, "-m", "bidirlm_jax.cli", "train", "--config", f"{ROOT}/configs/lm.py:tiny"]
    result = subprocess.run(
        [*cmd, "--workdir", str(workdir), *QUIET, *overrides], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # everything is a log line on stderr
    return [line.split(" ", 2)[2] for line in result.stderr.splitlines() if re.match(r"\d{4}-\d\d-\d\d ", line)]


def test_a_run_without_progress_bar_logs_plan_start_steps_checkpoints_and_end(tmp_path):
    run = [
        "--config.train.log_every=2",
        "--config.train.checkpoint_every=2",
        "--config.metrics.peak_flops_per_device=1e9",
    ]
    first = _train(tmp_path, "--config.train.steps=4", *run)
    params = sum(x.size for x in jax.tree.leaves(nnx.state(abstract_model(get_preset("tiny-qwen3"))[1], nnx.Param)))
    assert first[:7] == [
        "plan: objective causal_lm, 4 steps, random init of tiny-qwen3",
        "model: qwen3, 2 layers (2 full_attention), hidden 64, 4/2 heads, vocab 512, attention causal, "
        "compute float32, remat none",
        f"parameters: {params:,}, all trained (nothing frozen)",
        "mesh: data=4 fsdp=1 tensor=1 over 4 cpu devices, 1 process",
        "batch: 16 rows of 64 tokens in 1 micro-batch of 16 rows (4 rows per batch shard, 4 shards); "
        "1,024 tokens per step, 4,096 over the run",
        "attention kernels: auto (block q/kv 512/512); each layer type's is logged when the step compiles",
        f"starting fresh; checkpoints in {tmp_path}/checkpoints",
    ]
    assert any(re.fullmatch(r"attention full_attention \(16, 64, 4, 32\) float32: \w+ kernel", x) for x in first)
    records = {r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    steps = [x for x in first if x.startswith("step ")]
    assert [x.split(" | ")[0] for x in steps] == ["step 2/4", "step 4/4"]  # every train.log_every steps
    for line, step in zip(steps, (2, 4)):  # the values metrics.jsonl holds, as printed
        fields = line.split(" | ")
        assert fields[1:4] == [
            f"loss {records[step]['loss']:.4f}",
            f"accuracy {records[step]['accuracy']:.4f}",
            f"lr {records[step]['learning_rate']:.2e}",
        ]
        assert fields[4] == f"{records[step]['tokens_per_second']:,.0f} tokens/s"
        assert fields[5] == f"mfu {100 * records[step]['mfu']:.1f}%"  # against metrics.peak_flops_per_device
        assert re.fullmatch(r"eta \d+:\d\d:\d\d", fields[6])
    assert {"checkpoint 2 saved", "checkpoint 4 saved"} <= set(first)
    assert first[-1] == "finished at step 4 of 4"

    resumed = _train(tmp_path, "--config.train.steps=6", *run)
    assert f"resumed from step 4 ({tmp_path}/checkpoints)" in resumed
    assert resumed[-2:] == ["checkpoint 6 saved", "finished at step 6 of 6"]
    again = _train(tmp_path, "--config.train.steps=6", *run)
    assert again[-1] == "finished at step 6: nothing to do (raise --config.train.steps to train further)"
    assert not any(x.startswith("step ") for x in again)


class _Lines:
    """A subprocess's stderr lines, read by a thread so that every wait has a deadline."""

    def __init__(self, stream):
        self.seen: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(
            target=lambda: [self._queue.put(x) for x in stream] + [self._queue.put(None)], daemon=True
        ).start()

    def wait_for(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            line = self._queue.get(timeout=left)
            if line is None:
                break
            self.seen.append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no line matching {pattern!r} within {timeout}s:\n{''.join(self.seen)}")


def test_ctrl_c_saves_a_checkpoint_at_the_interrupted_step_and_exits_130(tmp_path):
    cmd = [sys.executable, "-m", "bidirlm_jax.cli", "train", "--config", f"{ROOT}/configs/lm.py:tiny"]
    run = ["--config.train.steps=100000", "--config.train.log_every=1", "--config.train.checkpoint_every=1000"]
    proc = subprocess.Popen(
        [*cmd, "--workdir", str(tmp_path), *QUIET, *run], env=ENV, stderr=subprocess.PIPE, text=True
    )
    try:
        lines = _Lines(proc.stderr)
        lines.wait_for(r"step 3/100000", timeout=240)
        proc.send_signal(signal.SIGINT)
        lines.wait_for(r"^Ctrl-C: saving a checkpoint after this step", timeout=60)
        stopped = lines.wait_for(r"stopped by", timeout=120)
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()
        proc.wait(timeout=60)
    match = re.search(
        r"stopped by Ctrl-C \(SIGINT\) after step (\d+); the same command resumes from step (\d+)$", stopped
    )
    assert match and match.group(1) == match.group(2), stopped
    step = int(match.group(1))
    assert step >= 3 and latest_step(tmp_path / "checkpoints") == step  # no checkpoint was due before step 1000
    assert f"checkpoint {step} saved" in "".join(lines.seen)


def _send_sigint() -> None:
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(100):  # the handler runs between bytecodes of the main thread
        time.sleep(0.01)


def test_a_second_ctrl_c_stops_at_once_and_other_callers_keep_keyboard_interrupt():
    stop = loop._Preemption(ctrl_c=True)
    try:
        _send_sigint()
        assert stop.requested() and stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            _send_sigint()
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    plain = loop._Preemption()  # train() for the demo, ablations: Ctrl-C interrupts them as before
    try:
        with pytest.raises(KeyboardInterrupt):
            _send_sigint()
        assert not plain.requested()
    finally:
        plain.close()


def test_stopping_at_once_says_where_a_rerun_resumes(caplog):
    with caplog.at_level(logging.INFO, logger="bidirlm_jax.train"):
        runlog.log_stopped_at_once(7, 4)
        runlog.log_stopped_at_once(3, None)
    assert caplog.messages == [
        "stopped at once after step 7; the same command resumes from step 4 (the 3 steps since are lost)",
        "stopped at once after step 3; no checkpoint yet: the same command starts afresh",
    ]


def test_console_lines_come_from_process_0_unless_asked(monkeypatch, capsys):
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    for index, all_processes, shown in ((0, False, True), (1, False, False), (1, True, True)):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        with runlog.console_logging(all_processes=all_processes):
            runlog.log_checkpoint(5)
        assert ("checkpoint 5 saved" in capsys.readouterr().err) == shown
    runlog.log_checkpoint(6)  # closed: the handler is gone
    assert "checkpoint 6" not in capsys.readouterr().err
    assert logging.getLogger("bidirlm_jax").propagate
