"""Qwen3-ASR checkpoints: transformers' -hf layout and the original `thinker.*` layout load into the same
model, the text backbone loads alone, our export is what transformers 5.24 loads as
`Qwen3ASRForConditionalGeneration` (no missing or unexpected keys, our hidden states), `bidirlm convert`
round-trips bit for bit, and weights without an audio tower are refused (API and CLI, nothing written).

Tolerance where outputs are compared: the project's 1e-4 relative, as test_qwen3_asr_model explains.
"""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")

from safetensors.torch import load_file as load_torch  # noqa: E402

import bidirlm_jax  # noqa: E402
from bidirlm_jax.cli import main  # noqa: E402
from bidirlm_jax.errors import CheckpointError  # noqa: E402
from bidirlm_jax.models.towers.qwen3_asr.model import Qwen3ASR  # noqa: E402
from bidirlm_jax.models.transformer import Transformer  # noqa: E402
from bidirlm_jax.testing import qwen3_asr as ref  # noqa: E402

REL_TOL = 1e-4
SIDE_FILES = {
    "preprocessor_config.json": '{"feature_size": 128}\n',
    "tokenizer_config.json": '{"model_max_length": 42}\n',
}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """transformers' own save of a tiny random Qwen3-ASR (-hf layout), with processor and tokenizer files."""
    path = tmp_path_factory.mktemp("asr_hf")
    ref.build_asr_model(ref.asr_config()).save_pretrained(path)
    for name, text in SIDE_FILES.items():
        (path / name).write_text(text)
    return path


@pytest.fixture(scope="module")
def thinker_dir(hf_dir, tmp_path_factory):
    """The same weights in the original Qwen3-ASR layout (`thinker.*`, projector inside the tower)."""
    path = tmp_path_factory.mktemp("asr_thinker")
    ref.save_thinker_layout(hf_dir, path)
    return path


def _params(model) -> dict:
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@nnx.jit
def _hidden_states(model, inputs):
    return model.hidden_states(**inputs)


def _forward(model) -> np.ndarray:
    """The model's hidden states on the tiny batch: its host-side `prepare`, then one compiled program (what
    `model(...)` runs, without the LM head; op by op, each operation would compile on its own)."""
    ids, mask, features, frames = ref.asr_batch()
    return np.asarray(_hidden_states(model, model.prepare(ids, mask, features, frames)))


def test_both_layouts_load_the_same_model(hf_dir, thinker_dir):
    hf, original = bidirlm_jax.from_pretrained(hf_dir), bidirlm_jax.from_pretrained(thinker_dir)
    assert isinstance(original, Qwen3ASR) and original.config.audio_token_id == 1004
    assert original.config.text.mrope_section is None  # equal M-RoPE rows: plain RoPE
    a, b = _params(hf), _params(original)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    np.testing.assert_array_equal(_forward(original), _forward(hf))


@pytest.mark.parametrize("layout", ["hf", "thinker"])
def test_text_backbone_alone(hf_dir, thinker_dir, layout):
    """`text_only` loads the backbone as a `Transformer`: the same parameters as the whole model's text part."""
    path = hf_dir if layout == "hf" else thinker_dir
    text = bidirlm_jax.from_pretrained(path, text_only=True)
    assert isinstance(text, Transformer)
    whole = _params(bidirlm_jax.from_pretrained(hf_dir).text)
    alone = _params(text)
    assert alone.keys() == whole.keys() and all(np.array_equal(alone[k], whole[k]) for k in alone)


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_export_loads_in_transformers(hf_dir, thinker_dir, tmp_path, attention):
    """Our export of the original layout is transformers' own class with every key accounted for, and
    computes our hidden states (bidirectional through the text config's flag)."""
    from transformers import Qwen3ASRForConditionalGeneration

    model = bidirlm_jax.from_pretrained(thinker_dir, attention=attention)
    out = bidirlm_jax.save_pretrained(model, tmp_path / "export")
    hf, info = Qwen3ASRForConditionalGeneration.from_pretrained(
        out, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert getattr(hf.config.text_config, "is_causal", True) == (attention == "causal")
    ids, mask, features, frames = ref.asr_batch()
    with torch.no_grad():
        expected = hf.eval()(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                             input_features=torch.as_tensor(features), input_features_mask=torch.as_tensor(frames),
                             output_hidden_states=True).hidden_states[-1].numpy()  # fmt: skip
    valid = mask.astype(bool)
    ours, theirs = _forward(model)[valid], expected[valid]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=REL_TOL * np.abs(theirs).max())


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    """transformers' save of the tiny model in bfloat16."""
    path = tmp_path_factory.mktemp("asr_bf16")
    ref.build_asr_model(ref.asr_config()).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_convert_round_trip_is_bit_exact(hf_dir, bf16_dir, tmp_path, dtype):
    """-hf → our checkpoint → -hf gives transformers' own tensors back bit for bit (in their stored dtype),
    with the processor and tokenizer files carried; the checkpoint loads as the same model."""
    if dtype == "bfloat16":
        for name, text in SIDE_FILES.items():
            (bf16_dir / name).write_text(text)
        hf_dir = bf16_dir
    checkpoint = bidirlm_jax.convert(hf_dir, tmp_path / "ckpt")
    assert (checkpoint / "params").is_dir()
    back = bidirlm_jax.convert(checkpoint, tmp_path / "back")
    source, result = load_torch(hf_dir / "model.safetensors"), load_torch(back / "model.safetensors")
    assert source.keys() == result.keys()
    for key, tensor in source.items():
        assert result[key].dtype == tensor.dtype == getattr(torch, dtype) and torch.equal(result[key], tensor), key
    for name, text in SIDE_FILES.items():
        assert (checkpoint / name).read_text() == (back / name).read_text() == text
    restored = bidirlm_jax.from_pretrained(checkpoint)
    np.testing.assert_array_equal(_forward(restored), _forward(bidirlm_jax.from_pretrained(hf_dir)))


def test_convert_original_layout_to_hf(hf_dir, thinker_dir, tmp_path):
    """The original layout re-exported (`--to hf`) holds transformers' -hf tensors, bit for bit."""
    assert main(["convert", str(thinker_dir), str(tmp_path / "hf"), "--to", "hf"]) == 0
    source, result = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert source.keys() == result.keys() and all(np.array_equal(result[k], source[k]) for k in source)


def test_weights_without_an_audio_tower_are_refused(hf_dir, tmp_path, capsys):
    """A Qwen3-ASR config over text-only weights: a clear error naming the way out; the CLI exits 2 and
    writes nothing. The text backbone still loads alone."""
    text_only = tmp_path / "text_only"
    text_only.mkdir()
    tensors = load_file(hf_dir / "model.safetensors")
    save_file(
        {k: v for k, v in tensors.items() if k.startswith("model.language_model.")}, text_only / "model.safetensors"
    )
    (text_only / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no audio tower.*text_only=True"):
        bidirlm_jax.from_pretrained(text_only)
    assert main(["convert", str(text_only), str(tmp_path / "out")]) == 2
    assert "no audio tower" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["text_only"]
    assert isinstance(bidirlm_jax.from_pretrained(text_only, text_only=True), Transformer)
