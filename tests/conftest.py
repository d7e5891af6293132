"""Test-wide settings: 8 fake CPU devices (set before jax is imported) and no network."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
