"""The released BidirLM-Omni layout both ways: a tiny directory written as the release lays one out (its
config spelled as the remote config classes write it, random weights) loads as the model built from the
same weights, and writing it back is bit-exact (the unreachable DeepStack merger carried); the
sentence-transformers export names the released remote code and carries the tokenizer's companions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

pytest.importorskip("torch")

import bidirlm_jax
from bidirlm_jax.cli import main as cli_main
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.hf import load_weights
from bidirlm_jax.io.hf_config_omni import AUTO_MAP, omni_config_from_hf
from bidirlm_jax.io.hf_config_vision import qwen3_vl_config_from_hf
from bidirlm_jax.io.omni_export import export_omni, read_chat_template
from bidirlm_jax.io.weights.audio import load_audio_tower
from bidirlm_jax.io.weights.load import TensorDict
from bidirlm_jax.models import params
from bidirlm_jax.models.towers.omni import model as omni_model
from bidirlm_jax.testing import omni as ref
from bidirlm_jax.testing import qwen3_vl

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


@pytest.fixture(scope="module")
def hf():
    return ref.vl_model(), ref.audio_encoder()


@pytest.fixture(scope="module")
def release_dir(hf, tmp_path_factory):
    path = tmp_path_factory.mktemp("omni_io") / "release"
    ref.save_release(*hf, path)
    (path / "chat_template.jinja").write_text(TEMPLATE)
    (path / "preprocessor_config.json").write_text(json.dumps({"feature_extractor_type": "WhisperFeatureExtractor"}))
    return path


def _tensors(path) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _assert_same_state(a: nnx.Module, b: nnx.Module) -> None:
    flat_a, flat_b = dict(nnx.to_flat_state(nnx.state(a))), dict(nnx.to_flat_state(nnx.state(b)))
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[key][...]), np.asarray(flat_b[key][...]))


def test_loads_as_the_model_built_from_the_same_weights(hf, release_dir):
    """The Omni's text stack and tower are the Qwen3-VL model's, its audio tower the AuT encoder's."""
    vl, encoder = hf
    model = bidirlm_jax.from_pretrained(release_dir)
    vl_config = qwen3_vl_config_from_hf(vl.config.to_dict())
    vl_config = vl_config.replace(text=vl_config.text.replace(tie_word_embeddings=True))
    ours_vl = load_weights(TensorDict(qwen3_vl.state_tensors(vl)), vl_config)
    _assert_same_state(model.text, ours_vl.text)
    _assert_same_state(model.visual, ours_vl.visual)
    tower = nnx.eval_shape(lambda: type(model.audio_tower)(model.config.audio, rngs=nnx.Rngs(0)))
    tower = nnx.merge(*nnx.split(tower))
    load_audio_tower(tower, ref.release_tensors(vl, encoder))
    _assert_same_state(model.audio_tower, tower)


def test_round_trip_is_bit_exact(release_dir, tmp_path):
    model = bidirlm_jax.from_pretrained(release_dir)
    out = bidirlm_jax.save_pretrained(model, tmp_path / "out")
    source, written = _tensors(release_dir), _tensors(out)
    assert written.keys() == source.keys()
    assert any(k.startswith("visual.deepstack_merger_list.2.") for k in written)  # the unreachable tap, carried
    for key, value in source.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)
        assert written[key].dtype == value.dtype
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bidirlm_omni" and config["auto_map"] == AUTO_MAP
    assert config["architectures"] == ["BidirLMOmniModel"]
    assert config["audio_config"]["n_window"] == 50 and config["vision_config"]["deepstack_visual_indexes"] == [0, 1, 3]
    assert config["text_config"]["rope_scaling"]["mrope_section"] == [6, 5, 5]
    assert config["text_weights_source"] == "visual"  # a field only the remote code reads, carried
    assert omni_config_from_hf(config) == model.config
    assert not list(out.glob("*.py"))  # the remote code is named, never copied


def test_omitted_fields_take_the_remote_defaults():
    """transformers writes only what differs from a config class's defaults: the remote classes' then apply."""
    config = omni_config_from_hf(
        {"model_type": "bidirlm_omni", "text_config": {"hidden_size": 3584}, "vision_config": {}, "audio_config": {}}
    )
    assert config.text.rope_full.theta == 5e6 and config.text.mrope_section == (24, 20, 20)
    assert config.text.tie_word_embeddings and config.text.num_layers == 32
    assert config.audio.n_window == 100 and config.audio.n_window_infer == 400
    assert config.audio.audio_attention == "clip" and config.vision.deepstack_visual_indexes == (8, 16, 24)
    assert config.audio_token_id == 151676 and config.image_token_id == 151655
    runtime = bidirlm_jax.io.hf_config.runtime_from_hf({"model_type": "bidirlm_omni"})
    assert runtime.attention == "bidirectional"


def test_export_writes_the_release_with_sentence_transformers_modules(release_dir, tmp_path):
    out = export_omni(release_dir, tmp_path / "encoder")
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and pooling["word_embedding_dimension"] == 64
    st = json.loads((out / "sentence_bert_config.json").read_text())
    assert st["model_args"] == {"trust_remote_code": True} and st["max_seq_length"] == 1024
    assert read_chat_template(out) == TEMPLATE and (out / "preprocessor_config.json").is_file()
    for key, value in _tensors(release_dir).items():
        np.testing.assert_array_equal(_tensors(out)[key], value)


def test_bad_exports_are_refused(release_dir, qwen_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match="not a BidirLM-Omni model"):
        export_omni(qwen_dir, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    causal = bidirlm_jax.from_pretrained(release_dir, attention="causal")
    with pytest.raises(ConfigError, match="bidirectional"):
        bidirlm_jax.save_pretrained(causal, tmp_path / "causal")
    assert not (tmp_path / "causal").exists()
    assert cli_main(["export", str(release_dir), str(tmp_path / "cli")]) == 0  # the CLI sends Omni sources here
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["model_type"] == "bidirlm_omni"


def test_param_counts_of_the_released_shape(tmp_path):
    """mteb's published counts of BidirLM-Omni-2.5B (omni notes F1), computed abstractly from a config.json."""
    (tmp_path / "config.json").write_text(json.dumps(ref.OMNI_2_5B))
    assert bidirlm_jax.param_count(tmp_path) == 2_445_009_536
    _, state = omni_model.abstract_model(omni_config_from_hf(ref.OMNI_2_5B))
    counts = {part: params.count(state[part]) for part in ("text", "visual", "audio_tower")}
    assert counts == {"text": 1_720_574_976, "visual": 406_957_056, "audio_tower": 317_477_504}


def test_convert_round_trip_and_a_checkpoint_loaded_without_a_tower(release_dir, tmp_path):
    """`bidirlm convert` to our checkpoint and back is bit-exact; the checkpoint loads with one tower left out."""
    assert cli_main(["convert", str(release_dir), str(tmp_path / "ckpt")]) == 0
    assert cli_main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "back")]) == 0
    back, source = _tensors(tmp_path / "back"), _tensors(release_dir)
    assert back.keys() == source.keys()
    for key, value in source.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    full = bidirlm_jax.from_pretrained(tmp_path / "ckpt")
    no_audio = bidirlm_jax.from_pretrained(tmp_path / "ckpt", audio=False)
    assert no_audio.audio_tower is None and no_audio.visual is not None
    _assert_same_state(no_audio.visual, full.visual)
