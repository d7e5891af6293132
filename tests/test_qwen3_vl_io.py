"""Qwen3-VL checkpoints in and out (io.model_types, io.hf, io.checkpoint) against transformers 5.24 (tiny,
random, fp32): both key layouts load as our `Qwen3VL`, exports load as transformers' own Qwen3-VL
classes, `bidirlm convert` round-trips bit for bit, text-only users get the text backbone alone.

Hidden states are compared at the project's 1e-4 relative bar on valid tokens (the derivation is
test_qwen3_vl_model's: the tower's ~1e-6 fed through three text layers of 128-term reductions; a wrong
key, layout or tying moves them by 1e-2 or more). Weights are compared exactly: loading and writing only
reshape them.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

import bidirlm_jax
from bidirlm_jax.cli import main
from bidirlm_jax.errors import CheckpointError, ConfigError
from bidirlm_jax.io.hf_config import config_from_hf
from bidirlm_jax.models.towers.qwen3_vl.model import Qwen3VL
from bidirlm_jax.models.transformer import Transformer
from bidirlm_jax.testing import qwen3_vl as ref
from tests.test_hf import assert_bit_exact, tensors
from tests.test_qwen3_vl_model import GRIDS, IMG, batch, pixels, rel_err

REL_TOL = 1e-4  # see the module docstring
PREPROCESSOR = {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 16, "merge_size": 2}


def _generation(tied: bool = False):
    """A bidirectional Qwen3VLForConditionalGeneration whose tower declares a DeepStack merger past its depth."""
    config = ref.qwen3_vl_config(causal=False, deepstack=(0, 1, 3))
    config.tie_word_embeddings = tied
    return ref.randomize(transformers.Qwen3VLForConditionalGeneration(config))


def _inputs(with_images: bool = True) -> dict:
    ids, mask = batch()
    if not with_images:  # the same rows with every image token replaced by text
        ids = np.where(ids == IMG, 7, ids)
    out = dict(input_ids=ids, attention_mask=mask)
    if with_images:
        out.update(pixel_values=pixels(), image_grid_thw=np.asarray(GRIDS))
    return out


def _theirs(model, inputs: dict):
    """transformers' outputs (`last_hidden_state` of its Qwen3VLModel, and logits when it has a head)."""
    kw = {k: torch.as_tensor(v) for k, v in inputs.items()}
    kw["mm_token_type_ids"] = (kw["input_ids"] == IMG).long()
    with torch.no_grad():
        base = model.model if hasattr(model, "lm_head") else model
        hidden = base(**kw).last_hidden_state.numpy()
        logits = model(**kw).logits.numpy() if hasattr(model, "lm_head") else None
    return hidden, logits


@pytest.fixture(scope="module")
def hf():
    return _generation()


@pytest.fixture(scope="module")
def dirs(hf, tmp_path_factory):
    """The same weights as transformers writes them: `Qwen3VLModel` (visual.*, language_model.*, one file)
    and `Qwen3VLForConditionalGeneration` (model.visual.*, model.language_model.*, lm_head; sharded)."""
    root = tmp_path_factory.mktemp("qwen3_vl")
    hf.model.save_pretrained(root / "base")
    hf.save_pretrained(root / "generation", max_shard_size="200KB")
    assert len(json.loads((root / "generation" / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    return root


@pytest.fixture(scope="module")
def expected(hf):
    return _theirs(hf, _inputs())


def test_multimodal_tie_word_embeddings_is_read_from_the_top():
    """transformers 5 ties a Qwen3-VL LM head by the top-level flag; text_config's (when any) is not it."""
    d = ref.qwen3_vl_config().to_dict()
    for top, inner in ((True, None), (True, False), (False, True)):
        text = {k: v for k, v in d["text_config"].items() if k != "tie_word_embeddings"}
        if inner is not None:
            text["tie_word_embeddings"] = inner
        assert config_from_hf({**d, "text_config": text, "tie_word_embeddings": top}).tie_word_embeddings is top


@pytest.mark.parametrize("layout", ["base", "generation"])
def test_both_layouts_load_as_qwen3vl(layout, hf, dirs, expected):
    model = bidirlm_jax.from_pretrained(dirs / layout)
    assert isinstance(model, Qwen3VL) and model.runtime.attention == "bidirectional"
    assert len(model.visual.deepstack_mergers) == 3  # the merger past the depth is carried
    out = model(**_inputs())
    mask = _inputs()["attention_mask"]
    assert rel_err(out.hidden_states, expected[0], mask) < REL_TOL
    if layout == "generation":  # an untied head of its own
        assert not model.config.text.tie_word_embeddings
        assert rel_err(out.logits, expected[1], mask) < REL_TOL
    else:  # transformers' base class has no head (its config says untied): logits from the tied embedding
        assert model.config.text.tie_word_embeddings


def test_export_loads_as_transformers_qwen3_vl(hf, dirs, expected, tmp_path):
    """Written as Qwen3VLForConditionalGeneration, carrying the mode in text_config.is_causal: both of
    transformers' classes load it with no missing or unexpected key and give our hidden states."""
    ours = bidirlm_jax.from_pretrained(dirs / "generation")
    out = bidirlm_jax.save_pretrained(ours, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert config["text_config"]["is_causal"] is False and config["tie_word_embeddings"] is False
    assert config["vision_config"]["initializer_range"] == hf.config.vision_config.initializer_range  # carried
    mask = _inputs()["attention_mask"]
    for cls, headless in (
        (transformers.Qwen3VLModel, {"lm_head.weight"}),
        (transformers.Qwen3VLForConditionalGeneration, set()),
    ):
        theirs, info = cls.from_pretrained(out, attn_implementation="eager", output_loading_info=True)
        assert not info["missing_keys"] and info["unexpected_keys"] == headless, info  # the base class has no head
        assert theirs.config.text_config.is_causal is False
        assert rel_err(_theirs(theirs.eval(), _inputs())[0], expected[0], mask) < REL_TOL
    assert_bit_exact(dirs / "generation", out)


def _mixed_precision_source(dirs, root):
    """The generation layout in one file, matrices bf16 and norms fp32, with a processor and a tokenizer file."""
    src = root / "src"
    src.mkdir()
    stored = {k: v if "norm" in k else v.astype(ml_dtypes.bfloat16) for k, v in tensors(dirs / "generation").items()}
    save_file(stored, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text((dirs / "generation" / "config.json").read_text())
    (src / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    (src / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    return src


def test_convert_round_trip_is_bit_exact(dirs, tmp_path):
    """HF -> checkpoint -> HF keeps every tensor's bytes and dtype (towers' included, the unused DeepStack
    merger too) and carries the processor and tokenizer files; the checkpoint loads as Qwen3VL."""
    src = _mixed_precision_source(dirs, tmp_path)
    assert main(["convert", str(src), str(tmp_path / "ckpt")]) == 0
    assert main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "back")]) == 0
    assert_bit_exact(src, tmp_path / "back")
    assert "model.visual.deepstack_merger_list.2.linear_fc2.weight" in tensors(tmp_path / "back")
    for out in ("ckpt", "back"):
        assert json.loads((tmp_path / out / "preprocessor_config.json").read_text()) == PREPROCESSOR
        assert (tmp_path / out / "tokenizer_config.json").is_file()
    from_checkpoint = bidirlm_jax.from_pretrained(tmp_path / "ckpt")
    assert isinstance(from_checkpoint, Qwen3VL)
    text = bidirlm_jax.from_pretrained(tmp_path / "ckpt", vision=False)  # the text part of the orbax tree alone
    assert isinstance(text, Transformer)
    ids, mask = batch()
    np.testing.assert_array_equal(
        text(np.where(ids == IMG, 7, ids), mask).hidden_states, bidirlm_jax.from_pretrained(src, vision=False)(
            np.where(ids == IMG, 7, ids), mask).hidden_states
    )  # fmt: skip


def test_text_backbone_alone(dirs, tmp_path):
    """vision=False, or a Qwen3-VL config whose weights hold no tower, gives the text Transformer: the same
    hidden states as Qwen3VL (and transformers) on text, and a project error when given images."""
    text_inputs = _inputs(with_images=False)
    full = bidirlm_jax.from_pretrained(dirs / "generation")
    text = bidirlm_jax.from_pretrained(dirs / "generation", vision=False)
    assert isinstance(text, Transformer)
    theirs = _theirs(_generation_from(dirs), text_inputs)[0]
    mask = text_inputs["attention_mask"]
    assert rel_err(text(**text_inputs).hidden_states, theirs, mask) < REL_TOL
    assert rel_err(full(**text_inputs).hidden_states, theirs, mask) < REL_TOL
    with pytest.raises(ConfigError, match="no vision tower"):
        text(**_inputs())

    towerless = tmp_path / "towerless"
    towerless.mkdir()
    kept = {k: v for k, v in tensors(dirs / "generation").items() if not k.startswith("model.visual.")}
    save_file(kept, str(towerless / "model.safetensors"), metadata={"format": "pt"})
    (towerless / "config.json").write_text((dirs / "generation" / "config.json").read_text())
    assert isinstance(bidirlm_jax.from_pretrained(towerless), Transformer)
    with pytest.raises(CheckpointError, match="no vision tower"):
        bidirlm_jax.from_pretrained(towerless, vision=True)


def _generation_from(dirs):
    return transformers.Qwen3VLForConditionalGeneration.from_pretrained(
        dirs / "generation", attn_implementation="eager"
    ).eval()


def test_tied_head(tmp_path):
    """A tied Qwen3-VL checkpoint stores no lm_head: ours ties it (logits equal transformers'), and its
    export stores none either and loads in transformers with nothing missing."""
    hf = _generation(tied=True)
    hf.save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in tensors(tmp_path / "tied")
    model = bidirlm_jax.from_pretrained(tmp_path / "tied")
    assert model.config.text.tie_word_embeddings
    hidden, logits = _theirs(hf, _inputs())
    mask = _inputs()["attention_mask"]
    assert rel_err(model(**_inputs()).logits, logits, mask) < REL_TOL
    out = bidirlm_jax.save_pretrained(model, tmp_path / "export")
    assert "lm_head.weight" not in tensors(out)
    _, info = transformers.Qwen3VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_param_count_includes_the_tower(hf, dirs):
    """A Qwen3-VL config.json counts as transformers' model: text, untied head, tower and every merger."""
    assert bidirlm_jax.param_count(dirs / "generation") == sum(p.numel() for p in hf.parameters())


def test_convert_refuses_a_tower_its_config_does_not_describe(dirs, tmp_path, capsys):
    """Tower tensors of another vision_config: exit 2, a message naming what is missing, nothing written."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("model.safetensors.index.json", *{p.name for p in (dirs / "generation").glob("*.safetensors")}):
        (src / name).symlink_to(dirs / "generation" / name)
    config = json.loads((dirs / "generation" / "config.json").read_text())
    config["vision_config"]["depth"] = 4
    (src / "config.json").write_text(json.dumps(config))
    assert main(["convert", str(src), str(tmp_path / "out")]) == 2
    assert "missing tensors ['blocks.3." in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
