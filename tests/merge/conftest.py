"""Fixtures of the merge tests: tiny random Qwen3 checkpoints, built once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.merge.checkpoints import BF16, hf_template, random, tokenizer, write


@pytest.fixture(scope="session")
def qwen() -> tuple[dict, dict]:
    return hf_template("qwen3")


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory, qwen) -> dict[tuple[str, int], Path]:
    """Three random tiny Qwen3 checkpoints per dtype (the first with a tokenizer, the second sharded)."""
    config, shapes = qwen
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for dtype in ("float32", "bfloat16"):
        for seed in range(3):
            tensors = random(shapes, seed, BF16 if dtype == "bfloat16" else np.float32)
            path = write(root / f"{dtype}-{seed}", tensors, {**config, "dtype": dtype}, shards=2 if seed == 1 else 1)
            if seed == 0:
                tokenizer(path)
            out[dtype, seed] = path
    return out
