"""io/hf.py: HF directories in and out — exports transformers loads natively in every attention mode
(and back as the original causal model), dtypes, sharded exports, multimodal layouts, pickled weights."""

import functools
import json

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import bidirlm_jax
from bidirlm_jax.io.hf import stored_dtypes
from bidirlm_jax.io.hf_config import read_runtime
from bidirlm_jax.testing import reference
from tests.hf_files import assert_bit_exact, tensors

BF16_TOL = 3e-2  # as tests/test_transformer.py: both sides round bf16 at different points


@pytest.fixture(scope="module")
def qwen_sliding_dir(tmp_path_factory):
    """Qwen3 with sliding layers (window 8 on layers 1 and 2), the one family member without them elsewhere."""
    config = reference.qwen3_config(use_sliding_window=True, sliding_window=reference.WINDOW, max_window_layers=1)
    return reference.save(reference.build(config), tmp_path_factory.mktemp("qwen3-sliding") / "hf")


def _hf(path, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", **kwargs).eval()


@pytest.mark.parametrize(
    "source, window",
    [(s, w) for s in ("gemma_dir", "qwen_sliding_dir") for w in ("half", "full", "none")]
    + [("qwen_dir", "full")],  # no sliding layers: the window mode changes nothing
)
def test_bidirectional_export_loads_natively_and_back_as_the_causal_original(source, window, request, tmp_path):
    """transformers reads the export (and its own re-save of it) as the intended bidirectional model;
    our reader recovers the declared window from either, so as causal it is the original model again."""
    src = request.getfixturevalue(source)
    model = bidirlm_jax.from_pretrained(src, attention="bidirectional", bidirectional_window=window)
    out = bidirlm_jax.save_pretrained(model, tmp_path / "export")
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    ids, mask = reference.batch()
    _hf(out).save_pretrained(tmp_path / "again")  # a user re-saving must not change the window
    again = _hf(tmp_path / "again")
    assert reference.max_rel_err(reference.logits(model, ids, mask), reference.hf_logits(again, ids, mask), mask) < 1e-4
    original = _causal_reference(src)
    for path in (out, tmp_path / "again"):
        run = read_runtime(path)
        assert (run.attention, run.bidirectional_window) == ("bidirectional", window)
        causal = bidirlm_jax.from_pretrained(path, attention="causal")
        assert causal.config.sliding_window == model.config.sliding_window
        assert reference.max_rel_err(reference.logits(causal, ids, mask), original, mask) < 1e-4


@functools.cache
def _causal_reference(src):
    """transformers' logits of the causal model saved at `src`, on `reference.batch()`."""
    return reference.hf_logits(_hf(src), *reference.batch())


@pytest.mark.parametrize("source", ["gemma_dir", "qwen_sliding_dir"])
def test_bf16_export_loads_in_transformers(source, request, tmp_path):
    model = bidirlm_jax.from_pretrained(request.getfixturevalue(source), attention="bidirectional")
    out = bidirlm_jax.save_pretrained(model, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {a.dtype.name for a in tensors(out).values()} == {"bfloat16"}
    ids, mask = reference.batch()
    theirs = reference.hf_logits(_hf(out, dtype=torch.bfloat16), ids, mask)
    ours = reference.logits(bidirlm_jax.from_pretrained(out, dtype="bfloat16"), ids, mask)
    assert reference.max_rel_err(ours, theirs, mask) < BF16_TOL


def test_fp16_checkpoint_loads(tmp_path):
    src = reference.save(reference.build(reference.qwen3_config()), tmp_path / "src", torch.float16)
    model = bidirlm_jax.from_pretrained(src)
    expected = load_file(str(src / "model.safetensors"))["model.embed_tokens.weight"].astype(np.float32)
    np.testing.assert_array_equal(np.asarray(model.embedder.embedding[...]), expected)


def test_tensor_dtypes_are_kept_per_tensor(gemma_dir, tmp_path):
    """An export in mixed precision (fp32 norms, bf16 matrices) keeps each tensor's dtype."""
    model = bidirlm_jax.from_pretrained(gemma_dir)
    dtypes = {k: "float32" if "norm" in k else "bfloat16" for k in stored_dtypes(gemma_dir)}
    out = bidirlm_jax.save_pretrained(model, tmp_path / "mixed", dtype="bfloat16", tensor_dtypes=dtypes)
    assert stored_dtypes(out) == dtypes
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"  # the embedding's


def test_sharded_export_with_index(qwen_dir, tmp_path):
    model = bidirlm_jax.from_pretrained(qwen_dir)
    out = bidirlm_jax.save_pretrained(model, tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for shard in shards:
        with safe_open(str(out / shard), "numpy") as f:
            assert f.metadata() == {"format": "pt"}
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors(out).values())
    ids, mask = reference.batch()
    theirs = reference.hf_logits(_hf(out), ids, mask)
    assert reference.max_rel_err(reference.logits(model, ids, mask), theirs, mask) < 1e-4
    assert_bit_exact(qwen_dir, out)


@pytest.mark.parametrize(
    "backbone, head, extra",
    [
        ("model.language_model.", "lm_head.weight", "model.visual.blocks.0.attn.qkv.weight"),  # Qwen3-VL
        ("language_model.model.", "language_model.lm_head.weight", "vision_tower.vision_model.embeddings.weight"),
        ("thinker.model.", "thinker.lm_head.weight", "thinker.audio_tower.conv2d1.weight"),  # Qwen3-ASR original
        ("language_model.", "language_model.lm_head.weight", "visual.patch_embed.proj.weight"),  # BidirLM-Omni
    ],
    ids=["qwen3-vl", "gemma3-multimodal", "qwen3-asr", "bidirlm-omni"],
)
def test_text_backbone_of_multimodal_checkpoints(backbone, head, extra, qwen_dir, tmp_path):
    tensors = load_file(str(qwen_dir / "model.safetensors"))
    renamed = {(head if k == "lm_head.weight" else backbone + k[len("model.") :]): v for k, v in tensors.items()}
    renamed[extra] = np.ones((4, 4), np.float32)
    (tmp_path / "mm").mkdir()
    save_file(renamed, str(tmp_path / "mm" / "model.safetensors"), metadata={"format": "pt"})
    text = json.loads((qwen_dir / "config.json").read_text())
    config = {"model_type": "qwen3_vl", "text_config": {**text, "model_type": "qwen3_vl_text"}, "vision_config": {}}
    (tmp_path / "mm" / "config.json").write_text(json.dumps(config))
    ids, mask = reference.batch()
    expected = reference.logits(bidirlm_jax.from_pretrained(qwen_dir), ids, mask)
    text = bidirlm_jax.from_pretrained(tmp_path / "mm", vision=False)  # the stand-in tower tensors are not read
    np.testing.assert_array_equal(reference.logits(text, ids, mask), expected)
