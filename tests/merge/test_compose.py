"""The BidirLM-Omni composition (issue 21 item 2): tiny Qwen3-VL, Bi+MNTP-like Qwen3 and Qwen3-ASR
checkpoints of three layouts (the ASR one in transformers' -hf layout and the original `thinker.*` one)
merged 1/3 each into a bidirlm_omni checkpoint: backbone the weighted mean (fp32, the merge kernel's exact
bits), towers bit for bit, a config that loads and runs every modality, the recorded settings, and bad
recipes refused with nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from flax import nnx
from safetensors.numpy import load_file

torch = pytest.importorskip("torch")

import transformers  # noqa: E402

import bidirlm_jax  # noqa: E402
from bidirlm_jax import cli  # noqa: E402
from bidirlm_jax.errors import ConfigError  # noqa: E402
from bidirlm_jax.merge import MergeModel, MergeSpec, linear_merge, load_merge_yaml, merge_checkpoints  # noqa: E402
from bidirlm_jax.merge.omni_recipe import OmniRecipe  # noqa: E402
from bidirlm_jax.models.towers.omni.model import Omni  # noqa: E402
from bidirlm_jax.pipeline.variants import BI_BASE, OMNI, OmniStage, Recipe, build_variants  # noqa: E402
from bidirlm_jax.testing import omni, qwen3_asr, qwen3_vl, reference  # noqa: E402
from tests.merge.checkpoints import tokenizer  # noqa: E402

THIRD = 1 / 3


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """{name: directory}: the VL input (with an image processor), the text encoder, the ASR input in both
    layouts (with a feature extractor and the tokenizer)."""
    root = tmp_path_factory.mktemp("compose")
    vl = qwen3_vl.randomize(transformers.Qwen3VLForConditionalGeneration(omni.vl_model().config), seed=1)
    vl.save_pretrained(root / "vl")
    (root / "vl" / "preprocessor_config.json").write_text(
        json.dumps(
            {"image_processor_type": "Qwen2VLImageProcessor", "merge_size": 2, "processor_class": "Qwen3VLProcessor"}
        )
    )
    text = reference.qwen3_config(vocab_size=1024, num_attention_heads=2, num_key_value_heads=1)
    reference.save(reference.build(text, seed=2), root / "text")
    tokenizer(root / "text")
    qwen3_asr.build_asr_model(qwen3_asr.asr_config(num_hidden_layers=3), seed=3).save_pretrained(root / "asr")
    (root / "asr" / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "feature_extractor_type": "WhisperFeatureExtractor",
                "feature_size": 128,
                "processor_class": "Qwen3ASRProcessor",
            }
        )
    )
    tokenizer(root / "asr")
    qwen3_asr.save_thinker_layout(root / "asr", root / "asr_thinker")
    tokenizer(root / "asr_thinker")
    (root / "asr_thinker" / "preprocessor_config.json").write_text(
        (root / "asr" / "preprocessor_config.json").read_text()
    )
    return {name: root / name for name in ("vl", "text", "asr", "asr_thinker")}


def _spec(trio, asr="asr", **recipe) -> MergeSpec:
    models = [MergeModel(str(trio[name]), THIRD) for name in ("vl", "text", asr)]
    return MergeSpec(models, compose=OmniRecipe(**recipe))


def _tensors(path) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.fixture(scope="module")
def outputs(trio, tmp_path_factory):
    """The composition with the ASR input in each layout: {layout: (directory, MergeResult)}."""
    root = tmp_path_factory.mktemp("omni")
    return {
        name: (root / name, merge_checkpoints(_spec(trio, name), root / name, progress=False))
        for name in ("asr", "asr_thinker")
    }


@pytest.fixture(params=["asr", "asr_thinker"])
def composed(request, outputs):
    return request.param, *outputs[request.param]


def test_backbone_is_the_weighted_mean_and_towers_are_carried(trio, composed):
    asr_name, out, result = composed
    written, vl, text, asr = (_tensors(p) for p in (out, trio["vl"], trio["text"], trio[asr_name]))
    backbone = [k for k in written if k.startswith("language_model.")]
    assert backbone and not any("lm_head" in k for k in written)  # the Omni model ties its head
    asr_prefix = "thinker.model." if asr_name == "asr_thinker" else "model.language_model."
    for key in backbone:
        rel = key.removeprefix("language_model.")
        parts = [vl[f"model.language_model.{rel}"], text[f"model.{rel}"], asr[asr_prefix + rel]]
        expected = np.asarray(linear_merge(parts, [THIRD] * 3))  # the kernel's fp32 bits
        np.testing.assert_array_equal(written[key], expected, err_msg=key)
        np.testing.assert_allclose(written[key], np.mean(parts, axis=0), rtol=1e-6, atol=1e-6)
    for key, value in vl.items():
        if key.startswith("model.visual."):
            np.testing.assert_array_equal(written["visual." + key.removeprefix("model.visual.")], value)
    assert "visual.deepstack_merger_list.2.linear_fc2.weight" in written  # the unreachable tap, carried
    for key, value in asr.items():
        if "audio_tower." in key or "multi_modal_projector." in key:
            rel = key.split("audio_tower.")[-1].replace("model.multi_modal_projector.linear_", "proj")
            np.testing.assert_array_equal(written["audio_tower." + rel], value, err_msg=key)
    assert len(result.carried) == sum(k.startswith(("visual.", "audio_tower.")) for k in written)


def test_composed_config_and_files(composed):
    _, out, _ = composed
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bidirlm_omni" and config["audio_token_id"] == qwen3_asr.AUDIO_PAD
    assert config["audio_config"]["n_window"] == 50 and config["text_config"]["rope_theta"] == 5e6
    assert (out / "tokenizer.json").is_file()  # the ASR-extended tokenizer travels
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["feature_extractor_type"] == "WhisperFeatureExtractor" and processor["merge_size"] == 2
    assert "processor_class" not in processor


def test_composed_checkpoint_runs_every_modality(outputs):
    model = bidirlm_jax.from_pretrained(outputs["asr"][0])
    assert isinstance(model, Omni) and model.config.audio.audio_attention == "clip"
    row = [5, *omni.audio_run(60), 6, *omni.image_run((1, 2, 4)), 7]
    ids, mask = np.array([row]), np.ones((1, len(row)), np.int64)
    pixels = np.random.default_rng(0).uniform(-1, 1, (8, 1536)).astype(np.float32)
    features = np.random.default_rng(1).standard_normal((1, 128, 60)).astype(np.float32)
    image, audio = dict(pixel_values=pixels, image_grid_thw=[(1, 2, 4)]), dict(input_features=features)
    run = nnx.jit(lambda m, kw: m.hidden_states(**kw))
    outs = [run(model, model.prepare(ids, mask, **media)) for media in ({}, image, audio, {**image, **audio})]
    assert all(np.isfinite(np.asarray(o)).all() for o in outs)
    assert np.abs(np.asarray(outs[3]) - np.asarray(outs[0])).max() > 1e-2  # the media reach the text stack


def test_settings_are_resolved_and_recorded(trio, composed):
    _, out, _ = composed
    record = load_merge_yaml(out / "mergekit_config.yml")
    recipe = record.compose
    assert recipe.vision == str(trio["vl"]) and recipe.tokenizer == recipe.audio
    assert (recipe.rope_theta, recipe.mrope_section, recipe.deepstack_visual_indexes) == (5e6, (6, 5, 5), (0, 1, 3))
    assert recipe.special_token_rows == "average" and recipe.audio_start_token_id == 151669
    assert [m.weight for m in record.models] == [THIRD] * 3


def test_explicit_settings_and_specialist_rows(trio, tmp_path):
    out = tmp_path / "out"
    spec = _spec(
        trio,
        rope_theta=1e6,
        deepstack_visual_indexes=(0, 1, 2),
        special_token_rows="specialist",
        audio_start_token_id=qwen3_asr.AUDIO_START,
        audio_end_token_id=qwen3_asr.AUDIO_END,
    )
    merge_checkpoints(spec, out, progress=False)
    config = bidirlm_jax.from_pretrained(out).config
    assert config.text.rope_full.theta == 1e6 and config.vision.deepstack_visual_indexes == (0, 1, 2)
    embed = _tensors(out)["language_model.embed_tokens.weight"]
    vl, asr = _tensors(trio["vl"]), _tensors(trio["asr"])
    for row in (omni.IMAGE, qwen3_vl.VIDEO, omni.VISION_START, omni.VISION_END):
        np.testing.assert_array_equal(embed[row], vl["model.language_model.embed_tokens.weight"][row])
    for row in (qwen3_asr.AUDIO_PAD, qwen3_asr.AUDIO_START, qwen3_asr.AUDIO_END):
        np.testing.assert_array_equal(embed[row], asr["model.language_model.embed_tokens.weight"][row])
    average = _tensors(merge_checkpoints(_spec(trio), tmp_path / "avg", progress=False).out)
    np.testing.assert_array_equal(embed[:1000], average["language_model.embed_tokens.weight"][:1000])
    assert not np.array_equal(embed[1000], average["language_model.embed_tokens.weight"][1000])


def test_cli_and_yaml(trio, tmp_path):
    args = ["merge", *(f"--model={trio[n]}={THIRD}" for n in ("vl", "text", "asr")), "--compose-omni"]
    assert cli.main([*args, "--out", str(tmp_path / "cli")]) == 0
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(trio[n]), "parameters": {"weight": 1.0}} for n in ("vl", "text", "asr")],
        "bidirlm": {"compose": {"mrope_section": [6, 5, 5], "special_token_rows": "average"}},
    }
    (tmp_path / "omni.yaml").write_text(yaml.safe_dump(recipe))
    assert cli.main(["merge", "--config", str(tmp_path / "omni.yaml"), "--out", str(tmp_path / "yaml")]) == 0
    for key, value in _tensors(tmp_path / "cli").items():  # weights 1, 1, 1 normalised are 1/3 each
        np.testing.assert_allclose(_tensors(tmp_path / "yaml")[key], value, rtol=1e-6, atol=1e-7)


def test_bad_compositions_are_refused(trio, tmp_path, capsys):
    two_visions = [*(f"--model={trio[n]}=1" for n in ("vl", "text", "asr")), f"--model={trio['vl']}/.=1"]
    assert cli.main(["merge", *two_visions, "--compose-omni", "--out", str(tmp_path / "a")]) == 2
    assert "say which one" in capsys.readouterr().err and not (tmp_path / "a").exists()
    with pytest.raises(ConfigError, match="no input holds an audio tower"):
        merge_checkpoints(
            MergeSpec([MergeModel(str(trio[n]), 1) for n in ("vl", "text")], compose=OmniRecipe()),
            tmp_path / "b",
            progress=False,
        )
    assert not (tmp_path / "b").exists()
    small = tmp_path / "small"
    reference.save(
        reference.build(reference.qwen3_config(vocab_size=1000, num_attention_heads=2, num_key_value_heads=1)), small
    )
    spec = MergeSpec([MergeModel(str(p), 1) for p in (trio["vl"], small, trio["asr"])], compose=OmniRecipe())
    with pytest.raises(ConfigError, match=r"embed_tokens\.weight: .*\(1024, 64\).*\(1000, 64\)"):
        merge_checkpoints(spec, tmp_path / "c", progress=False)
    with pytest.raises(ConfigError, match="3 taps but the vision tower has 3|2 taps"):
        merge_checkpoints(_spec(trio, deepstack_visual_indexes=(0, 1)), tmp_path / "d", progress=False)
    with pytest.raises(ConfigError, match="outside the 1024-row vocabulary"):
        merge_checkpoints(_spec(trio, special_token_rows="specialist"), tmp_path / "e", progress=False)
    assert not any((tmp_path / n).exists() for n in "cde")


def test_the_pipeline_compose_stage(trio, tmp_path):
    """The "compose" recipe stage: the Omni variant from Bi+Base (the causal text input switched) and the
    two specialists, recorded, reused, and refused when rebuilt with other settings."""
    stage = OmniStage(vision=str(trio["vl"]), audio=str(trio["asr"]), text_from=BI_BASE)
    variants = build_variants(trio["text"], tmp_path, Recipe(omni=stage), names=[OMNI])
    omni_dir = variants[OMNI].path
    assert json.loads((omni_dir / "config.json").read_text())["model_type"] == "bidirlm_omni"
    written, text = _tensors(omni_dir), _tensors(trio["text"])
    vl, asr = _tensors(trio["vl"]), _tensors(trio["asr"])
    rel = "layers.0.mlp.up_proj.weight"
    parts = [vl[f"model.language_model.{rel}"], text[f"model.{rel}"], asr[f"model.language_model.{rel}"]]
    np.testing.assert_array_equal(written[f"language_model.{rel}"], np.asarray(linear_merge(parts, [THIRD] * 3)))
    manifest = json.loads((tmp_path / "variants.json").read_text())
    assert manifest[OMNI]["parent"] == BI_BASE and manifest[OMNI]["settings"]["weights"] == [THIRD] * 3
    assert build_variants(trio["text"], tmp_path, Recipe(omni=stage), names=[OMNI])[OMNI].path == omni_dir
    other = Recipe(omni=OmniStage(vision=stage.vision, audio=stage.audio, text_from=BI_BASE, weights=(0.5, 0.25, 0.25)))
    with pytest.raises(ConfigError, match="other settings"):
        build_variants(trio["text"], tmp_path, other, names=[OMNI])
