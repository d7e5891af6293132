"""Every preset counts exactly the parameters transformers builds for the same config."""

import json

import pytest
import torch
import transformers

import bidirlm_jax
from bidirlm_jax.io.hf_config import config_to_hf
from bidirlm_jax.models.presets import PRESETS

# The four BidirLM bases, as the released models' metadata gives them.
BIDIRLM_BASES = {
    "gemma3-270m": 268_098_176,
    "qwen3-0.6b": 596_049_920,
    "gemma3-1b": 999_885_952,
    "qwen3-1.7b": 1_720_574_976,
}


@pytest.mark.parametrize("name, count", BIDIRLM_BASES.items())
def test_bidirlm_bases_count_exactly(name, count):
    assert bidirlm_jax.param_count(PRESETS[name]) == count


@pytest.mark.parametrize("name", [n for n in PRESETS if not n.startswith("tiny")])
def test_preset_counts_equal_transformers(name, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(PRESETS[name])))
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    with torch.device("meta"):  # shapes only: a 32B model costs no memory
        model = transformers.AutoModelForCausalLM.from_config(config)
    theirs = sum(p.numel() for p in model.parameters())  # tied weights are one Parameter
    assert bidirlm_jax.param_count(tmp_path) == bidirlm_jax.param_count(PRESETS[name]) == theirs
