"""Test-wide settings: 8 fake CPU devices (set before jax is imported) and no network."""

import os
import tempfile

# XLA's CPU runtime may issue two independent collectives of one program in different orders on different
# fake devices when the scheduler optimises for concurrency; on a loaded machine each device then waits at a
# different rendezvous until XLA aborts the process ("Termination timeout ... of 40 seconds exceeded"). The
# sequential schedule keeps every device's collectives in one order.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_cpu_enable_concurrency_optimized_scheduler=false"
)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Compiled programs are cached on disk and shared by the xdist workers and the subprocesses tests start
# (training runs killed and resumed, notebooks): the same tiny steps are compiled once, not dozens of times.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"bidirlm-tests-jax-cache-{os.getuid()}")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")


import pytest


@pytest.fixture(scope="session")
def gemma_dir(tmp_path_factory):
    """A tiny random Gemma3 causal LM saved by transformers (tied embeddings, window 8)."""
    from bidirlm_jax.testing import reference

    return reference.save(reference.build(reference.gemma3_config()), tmp_path_factory.mktemp("gemma3") / "hf")


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    """A tiny random Qwen3 causal LM saved by transformers (untied LM head)."""
    from bidirlm_jax.testing import reference

    config = reference.qwen3_config(tie_word_embeddings=False)
    return reference.save(reference.build(config), tmp_path_factory.mktemp("qwen3") / "hf")
