"""io/hf_config.py, config.json <-> ModelConfig: legacy and transformers-5 fields, attention and
window modes, round trips, remote-code fields, bad files."""

import json
import logging

import pytest
import transformers

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.hf_config import (
    WINDOW_KEY,
    WINDOW_MODE_KEY,
    config_from_hf,
    config_to_hf,
    norm_plus_one,
    read_config,
    runtime_from_hf,
    set_attention_mode,
)
from bidirlm_jax.models.config import FULL, SLIDING, Rope
from bidirlm_jax.models.presets import PRESETS
from bidirlm_jax.models.runtime import Runtime
from bidirlm_jax.testing import reference

# The text part of google/gemma-3-4b-it's config.json as published (legacy rope fields).
GEMMA3_4B_LEGACY = {
    "model_type": "gemma3_text",
    "vocab_size": 262208,
    "hidden_size": 2560,
    "intermediate_size": 10240,
    "num_hidden_layers": 34,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
    "sliding_window": 1024,
    "sliding_window_pattern": 6,
    "rms_norm_eps": 1e-06,
    "hidden_activation": "gelu_pytorch_tanh",
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "max_position_embeddings": 131072,
    "bos_token_id": 2,
    "eos_token_id": [1, 106],
    "pad_token_id": 0,
}


def test_legacy_gemma3_fields_equal_the_preset():
    config = config_from_hf(GEMMA3_4B_LEGACY)
    assert config.rope_full == Rope(1_000_000.0, 8.0) and config.rope_sliding == Rope(10_000.0)
    assert config.layer_types[:6] == (SLIDING,) * 5 + (FULL,)
    assert config.eos_token_id == (1, 106)
    assert config.replace(eos_token_id=1) == PRESETS["gemma3-4b"]


def test_multimodal_config_reads_its_text_part():
    multimodal = {
        "model_type": "gemma3",
        "text_config": {k: v for k, v in GEMMA3_4B_LEGACY.items() if k != "model_type"},
    }
    assert config_from_hf(multimodal) == config_from_hf(GEMMA3_4B_LEGACY)


@pytest.mark.parametrize(
    "hf_config",
    [
        reference.gemma3_config(rope_scaling={"rope_type": "linear", "factor": 4.0}, final_logit_softcapping=3.0),
        reference.gemma3_config(tie_word_embeddings=False),
        reference.qwen3_config(tie_word_embeddings=True, attention_bias=True),
        reference.qwen3_config(use_sliding_window=True, sliding_window=16, max_window_layers=1),
    ],
    ids=["gemma3-rope-scaling", "gemma3-untied", "qwen3-tied-bias", "qwen3-sliding"],
)
def test_transformers_config_round_trip(hf_config, tmp_path):
    """transformers-5 dict -> ours -> config.json -> transformers: the same architecture, field by field."""
    ours = config_from_hf(hf_config.to_dict())
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(ours)))
    again = transformers.AutoConfig.from_pretrained(tmp_path)
    for key in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_key_value_heads",
        "head_dim",
        "layer_types",
        "sliding_window",
        "rope_parameters",
        "tie_word_embeddings",
        "attention_bias",
        "rms_norm_eps",
    ):
        assert getattr(again, key) == getattr(hf_config, key), key
    assert config_from_hf(again.to_dict()) == ours


@pytest.mark.parametrize("window", [512, 9])
def test_gemma3_bidirectional_export_keeps_the_declared_window(window, tmp_path):
    """transformers halves W in memory; the file must keep W or every save/reload halves it again."""
    config = config_from_hf(reference.gemma3_config(sliding_window=window).to_dict())
    exported = config_to_hf(config, Runtime(attention="bidirectional"))
    assert exported["use_bidirectional_attention"] is True and exported["sliding_window"] == window
    (tmp_path / "config.json").write_text(json.dumps(exported))
    loaded = transformers.AutoConfig.from_pretrained(tmp_path)
    assert loaded.sliding_window == window // 2 + 1  # transformers' exclusive bound, |i-j| <= W//2
    back = json.loads((tmp_path / "config.json").read_text())
    back, run = config_from_hf(back), runtime_from_hf(back)
    assert (run.attention, run.bidirectional_window, back.sliding_window) == ("bidirectional", "half", window)


def test_qwen3_bidirectional_export_uses_is_causal():
    exported = config_to_hf(PRESETS["qwen3-0.6b"], Runtime(attention="bidirectional"))
    assert exported["is_causal"] is False and "use_bidirectional_attention" not in exported
    assert runtime_from_hf(exported).attention == "bidirectional"


def test_set_attention_mode_keeps_multimodal_fields():
    vl = {
        "model_type": "qwen3_vl",
        "vision_config": {"depth": 2},
        "text_config": {
            "model_type": "qwen3_vl_text",
            **reference.qwen3_config().to_dict(),
            "rope_scaling": {"rope_type": "default", "mrope_section": [8, 4, 4]},
        },
    }
    vl["text_config"]["model_type"] = "qwen3_vl_text"
    out = set_attention_mode(vl, "bidirectional")
    assert out["text_config"]["is_causal"] is False and out["vision_config"] == {"depth": 2}
    assert out["text_config"]["model_type"] == "qwen3_vl_text" and "is_causal" not in vl["text_config"]
    assert "is_causal" not in set_attention_mode(out, "causal")["text_config"]


def test_unsupported_model_type_lists_the_supported_ones():
    with pytest.raises(ConfigError, match="llama.*supported: gemma3_text, qwen3"):
        config_from_hf({"model_type": "llama"})


def test_unsupported_rope_type_is_refused():
    with pytest.raises(ConfigError, match="yarn"):
        config_from_hf({**reference.qwen3_config().to_dict(), "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})


LEGACY_FIELDS = ("rope_theta", "rope_local_base_freq", "rope_scaling", "sliding_window_pattern", "max_window_layers")


@pytest.mark.parametrize(
    "hf_config, legacy",
    [
        (
            reference.gemma3_config(
                rope_parameters={
                    FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                    SLIDING: {"rope_type": "default", "rope_theta": 20_000.0},
                }
            ),
            {
                "rope_theta": 1_000_000.0,
                "rope_local_base_freq": 20_000.0,
                "rope_scaling": {"rope_type": "linear", "factor": 8.0},
                "sliding_window_pattern": 2,
            },
        ),
        (
            reference.qwen3_config(
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                use_sliding_window=True,
                sliding_window=8,
                max_window_layers=1,
            ),
            {"rope_theta": 1_000_000.0, "rope_scaling": None, "max_window_layers": 1},
        ),
    ],
    ids=["gemma3", "qwen3"],
)
def test_exports_carry_the_legacy_fields_older_readers_need(hf_config, legacy, tmp_path):
    """transformers 4.x reads rope and layer pattern only from the legacy fields; 5 reads both the same."""
    exported = config_to_hf(config_from_hf(hf_config.to_dict()))
    assert {k: exported[k] for k in LEGACY_FIELDS if k in exported} == legacy
    legacy_only = {k: v for k, v in exported.items() if k not in ("rope_parameters", "layer_types")}
    assert config_from_hf(legacy_only) == config_from_hf(exported)  # the legacy fields alone describe the model
    loaded = []
    for name, d in (("both", exported), ("v5", {k: v for k, v in exported.items() if k not in LEGACY_FIELDS})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(d))
        loaded.append(transformers.AutoConfig.from_pretrained(tmp_path / name))
    for key in ("rope_parameters", "layer_types", "sliding_window"):
        assert getattr(loaded[0], key) == getattr(loaded[1], key) == getattr(hf_config, key), key


@pytest.mark.parametrize("family", ["gemma3", "qwen3"])
@pytest.mark.parametrize("window", ["half", "full", "none"])
def test_bidirectional_exports_record_the_declared_window(family, window):
    """What transformers is told may be W//2 or unbounded; our own fields keep W and the mode."""
    hf = (
        reference.gemma3_config()
        if family == "gemma3"
        else reference.qwen3_config(use_sliding_window=True, sliding_window=8, max_window_layers=1)
    )
    causal = config_from_hf(hf.to_dict())
    exported = config_to_hf(causal, Runtime(attention="bidirectional", bidirectional_window=window))
    assert (exported[WINDOW_KEY], exported[WINDOW_MODE_KEY]) == (8, window)
    back, run = config_from_hf(exported), runtime_from_hf(exported)
    assert (run.attention, run.bidirectional_window, back.sliding_window) == ("bidirectional", window, 8)
    assert back == causal and runtime_from_hf(exported, attention="causal") == Runtime(bidirectional_window=window)
    assert WINDOW_KEY not in config_to_hf(causal)  # a causal export needs no private field
    assert WINDOW_KEY not in set_attention_mode(exported, "causal")


def test_remote_code_fields_are_dropped_and_logged(caplog):
    source = {
        **reference.qwen3_config().to_dict(),
        "auto_map": {"AutoModel": "modeling_custom.CustomModel"},
        "custom_pipelines": {"feature-extraction": {"impl": "pipeline.CustomPipeline"}},
        "tokenizer_file_hook": "hooks/tokenize.py",
        "keep_me": "a plain value",
    }
    with caplog.at_level(logging.WARNING, logger="bidirlm_jax"):
        exported = config_to_hf(config_from_hf(source))
    assert {"auto_map", "custom_pipelines", "tokenizer_file_hook"}.isdisjoint(exported)
    assert exported["keep_me"] == "a plain value"
    assert "auto_map" in caplog.text and "custom_pipelines" in caplog.text and "tokenizer_file_hook" in caplog.text


@pytest.mark.parametrize(
    "text, message",
    [
        ("[1, 2, 3]", "must hold a JSON object, got list"),
        ('{"model_type": "qwen3"', "is not valid JSON"),
        (json.dumps({**reference.qwen3_config().to_dict(), "num_attention_heads": 0}), "heads.*must be positive"),
    ],
    ids=["not-an-object", "not-json", "zero-heads"],
)
def test_bad_config_files_are_refused(text, message, tmp_path):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_config(tmp_path)


def test_mrope_section_is_read_and_written_back(tmp_path):
    """Qwen3-VL's text config names its M-RoPE sections (v5 `rope_parameters`, v4 `rope_scaling`, or none:
    transformers' default [24, 20, 20]); an export carries them, so reading it back gives the same model."""
    rope = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [6, 5, 5], "mrope_interleaved": True}
    text = {**reference.qwen3_config().to_dict(), "model_type": "qwen3_vl_text", "rope_parameters": rope}
    config = config_from_hf(text)
    assert config.mrope_section == (6, 5, 5) and config.rope_full == Rope(5e6)
    legacy = {**text, "rope_parameters": None, "rope_scaling": rope, "rope_theta": 5e6}
    assert config_from_hf(legacy) == config
    exported = config_to_hf(config)
    assert exported["rope_parameters"]["mrope_section"] == [6, 5, 5]
    assert config_from_hf(exported) == config
    (tmp_path / "config.json").write_text(json.dumps(exported))
    transformers.AutoConfig.from_pretrained(tmp_path)  # still a config transformers loads
    unnamed = {**text, "rope_parameters": {"rope_type": "default", "rope_theta": 5e6}}
    assert config_from_hf(unnamed).mrope_section == (24, 20, 20)
    bare = {k: v for k, v in unnamed.items() if k != "model_type"}
    assert config_from_hf({"model_type": "qwen3_vl", "text_config": bare}).mrope_section == (24, 20, 20)
    assert config_from_hf(reference.qwen3_config().to_dict()).mrope_section is None


def test_norm_plus_one_follows_the_family_flags():
    """Tensor-level tools (the merge's norm warning) ask this module, not the model type's spelling."""
    assert norm_plus_one(GEMMA3_4B_LEGACY) and norm_plus_one({"model_type": "gemma3"})
    assert norm_plus_one({"model_type": "gemma2"})  # not loadable here, but its norms are (1 + w) too
    assert not norm_plus_one({"model_type": "qwen3"}) and not norm_plus_one({"model_type": "qwen3_vl_text"})
    assert not norm_plus_one({})
