"""The released BidirLM text checkpoints (`model_type: bidirlm`, `io.released`): tiny ones written in their layouts
(`tests.released_files`, random weights) load as the same model in the transformers layout loaded bidirectionally
(equal hidden states), the Gemma window as the released config halves it (checked against transformers too);
every accepted spelling reads the same; `convert` round-trips them bit-exact; `--format bidirlm` writes them back
and refuses what the released code would run differently, writing nothing."""

import numpy as np
import pytest

from bidirlm_jax import param_count
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.conversion import convert
from bidirlm_jax.io.hf import from_pretrained, save_pretrained
from bidirlm_jax.io.hf_config import config_from_hf, read_config_dict, runtime_from_hf
from bidirlm_jax.testing import reference
from tests.hf_files import assert_bit_exact
from tests.released_files import LAYOUTS, write_released

FAMILIES = ("gemma3", "qwen3")


@pytest.fixture(scope="module")
def native(gemma_dir, qwen_dir):
    return {"gemma3": gemma_dir, "qwen3": qwen_dir}


@pytest.fixture(scope="module")
def released(native, tmp_path_factory):
    """(family, layout) -> a released directory of the conftest model."""
    root = tmp_path_factory.mktemp("released")
    return {(f, lay): write_released(native[f], root / f"{f}-{lay}", lay) for f in FAMILIES for lay in LAYOUTS}


@pytest.fixture(scope="module")
def native_hidden(native):
    """The native directories loaded bidirectionally (Gemma3: transformers' own W//2 window): hidden states."""
    ids, mask = reference.batch()
    out = {}
    for family, path in native.items():
        model = from_pretrained(path, attention="bidirectional", bidirectional_window="half")
        out[family] = np.asarray(model(ids, mask).hidden_states)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_released_layouts_load_as_the_bidirectional_native_model(released, native_hidden, family, layout):
    model = from_pretrained(released[family, layout])
    assert model.runtime.attention == "bidirectional"
    ids, mask = reference.batch()
    np.testing.assert_array_equal(np.asarray(model(ids, mask).hidden_states), native_hidden[family])


def test_gemma_window_is_the_released_half_window_as_transformers_runs_it(released, native):
    """The released Gemma config declares W with use_bidirectional_attention and halves it on load: |i-j| <= W//2,
    which transformers' Gemma3 runs for the same flag (sequences three windows long, left and right padding)."""
    model = from_pretrained(released["gemma3", "masked_lm"])
    assert model.runtime.bidirectional_window == "half" and model.config.sliding_window == reference.WINDOW
    theirs = reference.build(reference.gemma3_config(use_bidirectional_attention=True))  # conftest's weights (seed)
    ids, mask = reference.batch()
    assert (
        reference.max_rel_err(reference.logits(model, ids, mask), reference.hf_logits(theirs, ids, mask), mask) < 1e-5
    )


def _spellings(d: dict) -> list[dict]:
    """Other spellings of the same released config the reader accepts."""
    flat = {k: v for k, v in d.items()}
    nested_fields = {k: v for k, v in d.items() if k not in ("model_type", "auto_map", "architectures")}
    nested = {"model_type": "bidirlm", "auto_map": d["auto_map"], "text_config": nested_fields}
    family = "gemma3_text" if "query_pre_attn_scalar" in d else "qwen3"
    explicit = {**flat, "text_model_type": family}
    authors = {**flat, "model_type": "bigemma3_text" if family == "gemma3_text" else "biqwen3"}
    pooling = {k: v for k, v in flat.items() if k != "clf_pooling"} | {"classifier_pooling": "late"}
    return [nested, explicit, authors, pooling]


@pytest.mark.parametrize("family", FAMILIES)
def test_accepted_spellings_read_the_same_model(released, native, family):
    assert param_count(released[family, "masked_lm"]) == param_count(native[family])
    d = read_config_dict(released[family, "masked_lm"])
    config, runtime = config_from_hf(d), runtime_from_hf(d)
    for other in _spellings(d):
        assert runtime_from_hf(other) == runtime
        assert config_from_hf(other).replace(extra=()) == config.replace(extra=())


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"text_model_type": "llama"}, "names its text family 'llama'"),
        ({"text_config": [1]}, "text_config must be a JSON object"),
        ({"clf_pooling": "max"}, "clf_pooling 'max' is not one of"),
    ],
)
def test_bad_released_configs_are_refused(released, edit, message):
    from bidirlm_jax.io.released import clf_pooling

    d = {**read_config_dict(released["qwen3", "masked_lm"]), **edit}
    with pytest.raises(ConfigError, match=message):
        config_from_hf(d)
        clf_pooling(d)
    bare = {"model_type": "bidirlm", "auto_map": {}}
    with pytest.raises(ConfigError, match="describes no text model"):
        config_from_hf(bare)


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_round_trip_is_bit_exact(released, tmp_path, family):
    src = released[family, "masked_lm"]
    convert(src, tmp_path / "ckpt")
    back = convert(tmp_path / "ckpt", tmp_path / "back", format="bidirlm")
    direct = convert(src, tmp_path / "direct", to="hf", format="bidirlm")
    for out in (back, direct):
        assert_bit_exact(src, out)
        d = read_config_dict(out)
        assert d["model_type"] == "bidirlm" and d["architectures"] == ["BidirLMForMaskedLM"]
        repo = "BidirLM/BidirLM-1B-Base" if family == "gemma3" else "BidirLM/BidirLM-0.6B-Base"
        assert d["auto_map"]["AutoModel"] == f"{repo}--modeling_bidirlm.BidirLMModel"  # the source's class, its repo
        assert not list(out.glob("*.py"))  # the released code is named, never copied
    again = convert(direct, tmp_path / "again", to="hf", format="bidirlm")
    assert read_config_dict(again)["auto_map"] == read_config_dict(direct)["auto_map"]  # a named repo is kept
    native_out = convert(src, tmp_path / "native", to="hf")  # the transformers format: loads without remote code
    assert read_config_dict(native_out)["model_type"] == ("gemma3_text" if family == "gemma3" else "qwen3")
    assert_bit_exact(src, native_out)


def test_export_of_a_model_trained_here(native, tmp_path):
    """A model of ours written in the released format loads back as itself; a causal one, or a Gemma3 one with
    another window than the released code runs, is refused before anything is written."""
    ids, mask = reference.batch()
    model = from_pretrained(native["gemma3"], attention="bidirectional", bidirectional_window="half")
    out = save_pretrained(model, tmp_path / "ours", format="bidirlm")
    d = read_config_dict(out)
    assert d["sliding_window"] == reference.WINDOW and d["use_bidirectional_attention"] is True  # W: they halve it
    again = from_pretrained(out)
    np.testing.assert_array_equal(
        np.asarray(again(ids, mask).hidden_states), np.asarray(model(ids, mask).hidden_states)
    )
    for attention, window in (("causal", None), ("bidirectional", "full"), ("bidirectional", "none")):
        other = from_pretrained(native["gemma3"], attention=attention, bidirectional_window=window)
        with pytest.raises(ConfigError, match="runs every model bidirectionally"):
            save_pretrained(other, tmp_path / "refused", format="bidirlm")
        assert not (tmp_path / "refused").exists()
    with pytest.raises(ConfigError, match="export format 'onnx' is not one of"):
        save_pretrained(model, tmp_path / "refused", format="onnx")
    with pytest.raises(ConfigError, match="--to hf"):
        convert(native["qwen3"], tmp_path / "refused", format="bidirlm")
    assert not (tmp_path / "refused").exists()
