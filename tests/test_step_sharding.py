"""The paper presets' train steps compile on the meshes a launch would use without XLA replicating
activations and re-partitioning them ("Involuntary full rematerialization": wasted memory and traffic
every step on a pod)."""

import os
import sys
from pathlib import Path

import pytest

from tests import procs

HELPER = Path(__file__).with_name("compile_train_step.py")
# The presets' own meshes on 8 devices (mntp: fsdp over all, contrastive: data over all) and the
# (2, 2, 2) mesh that mixes all three axes (the embedding gather's output used to be re-partitioned there).
STEPS = ["mntp:gemma3-270m", "mntp:gemma3-270m@2,2,2", "contrastive:qwen3-0.6b", "contrastive:qwen3-0.6b@2,2,2"]


@pytest.mark.slow  # four compiles in a fresh process (no compilation cache: a hit would hide the log)
def test_paper_steps_compile_without_involuntary_rematerialization(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    done = procs.run(
        [sys.executable, str(HELPER), str(tmp_path), *STEPS], timeout=600, capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, procs.tail(done.stderr)
    assert done.stdout.count("compiled ") == len(STEPS), done.stdout  # every step was compiled, so XLA logged
    assert "Involuntary full rematerialization" not in done.stderr, procs.tail(done.stderr)
