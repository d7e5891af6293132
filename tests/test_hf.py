"""Converters: bit-exact round trips, exports transformers loads natively, layouts, and bad inputs."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import bidirlm_jax
from bidirlm_jax.cli import main
from bidirlm_jax.io.shards import ShardReader
from bidirlm_jax.testing import reference


@nnx.jit
def forward(model, ids, mask):
    return model(ids, mask).logits


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    return reference.save(reference.build(reference.gemma3_config()), tmp_path_factory.mktemp("g") / "hf")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    cfg = reference.qwen3_config(tie_word_embeddings=False)
    return reference.save(reference.build(cfg), tmp_path_factory.mktemp("q") / "hf")


def _tensors(path):
    reader = ShardReader(path)
    return {k: reader.get(k) for k in reader.keys()}


def _assert_bit_exact(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].tobytes() == tb[k].tobytes(), k


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_round_trip_through_a_checkpoint_is_bit_exact(dtype, tmp_path):
    src = reference.save(reference.build(reference.gemma3_config(tie_word_embeddings=False)), tmp_path / "src", dtype)
    flag = [] if dtype is None else ["--dtype", "bfloat16"]
    assert main(["convert", str(src), str(tmp_path / "ckpt")]) == 0
    assert main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "back"), *flag]) == 0
    _assert_bit_exact(src, tmp_path / "back")
    assert main(["convert", str(src), str(tmp_path / "direct"), "--to", "hf"]) == 0  # keeps the stored dtype
    _assert_bit_exact(src, tmp_path / "direct")


def test_fp16_checkpoint_loads(tmp_path):
    src = reference.save(reference.build(reference.qwen3_config()), tmp_path / "src", torch.float16)
    model = bidirlm_jax.from_pretrained(src)
    expected = load_file(str(src / "model.safetensors"))["model.embed_tokens.weight"].astype(np.float32)
    np.testing.assert_array_equal(np.asarray(model.embedder.embedding[...]), expected)


@pytest.mark.parametrize(
    "family, window, hf_kwargs",
    [("gemma", "half", {}), ("gemma", "full", {}), ("gemma", "none", {}), ("qwen", None, {})],
)
def test_bidirectional_export_reloads_natively(family, window, hf_kwargs, gemma_dir, qwen_dir, tmp_path):
    """Saved twice through transformers, the export still gives our logits in its attention mode."""
    src = gemma_dir if family == "gemma" else qwen_dir
    model = bidirlm_jax.from_pretrained(src, attention="bidirectional", bidirectional_window=window)
    out = bidirlm_jax.save_pretrained(model, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config
    ids, mask = reference.batch()
    ours = forward(model, ids, mask)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    hf.save_pretrained(tmp_path / "again")  # a user re-saving must not halve Gemma's window
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again", attn_implementation="eager").eval()
    assert reference.max_rel_err(ours, reference.hf_logits(again, ids, mask), mask) < 1e-4
    assert bidirlm_jax.from_pretrained(out).config.attention == "bidirectional"


def test_sharded_export_with_index(qwen_dir, tmp_path):
    model = bidirlm_jax.from_pretrained(qwen_dir)
    out = bidirlm_jax.save_pretrained(model, tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for shard in shards:
        with safe_open(str(out / shard), "numpy") as f:
            assert f.metadata() == {"format": "pt"}
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in _tensors(out).values())
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids, mask = reference.batch()
    assert reference.max_rel_err(forward(model, ids, mask), reference.hf_logits(hf, ids, mask), mask) < 1e-4
    _assert_bit_exact(qwen_dir, out)


@pytest.mark.parametrize(
    "backbone, head, extra",
    [
        ("model.language_model.", "lm_head.weight", "model.visual.blocks.0.attn.qkv.weight"),  # Qwen3-VL
        ("language_model.model.", "language_model.lm_head.weight", "vision_tower.vision_model.embeddings.weight"),
    ],
    ids=["qwen3-vl", "gemma3-multimodal"],
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
    expected = forward(bidirlm_jax.from_pretrained(qwen_dir), ids, mask)
    np.testing.assert_array_equal(forward(bidirlm_jax.from_pretrained(tmp_path / "mm"), ids, mask), expected)


def test_pickled_weights_need_an_explicit_flag(qwen_dir, tmp_path, capsys):
    src = tmp_path / "bin"
    shutil.copytree(qwen_dir, src)
    tensors = load_file(str(src / "model.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    assert main(["convert", str(src), str(tmp_path / "out")]) == 2
    assert "--allow-pickle" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "hf", "--allow-pickle"]) == 0
    _assert_bit_exact(qwen_dir, tmp_path / "out")


# --- bad inputs: a clear message, exit 2, nothing written -------------------------------------------


def _break(src, tmp_path, how):
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    weights = bad / "model.safetensors"
    config = json.loads((bad / "config.json").read_text())
    if how == "no-config":
        (bad / "config.json").unlink()
    elif how == "model-type":
        (bad / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "corrupt":
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\0" * 64)
    elif how == "shape":
        (bad / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    elif how == "missing":
        tensors = load_file(str(weights))
        del tensors["model.layers.1.mlp.up_proj.weight"]
        save_file(tensors, str(weights), metadata={"format": "pt"})
    elif how == "unexpected":
        tensors = load_file(str(weights))
        tensors["model.layers.1.mlp.extra.weight"] = np.zeros(3, np.float32)
        save_file(tensors, str(weights), metadata={"format": "pt"})
    return bad


@pytest.mark.parametrize(
    "how, message",
    [
        ("no-config", "no config.json"),
        ("model-type", "unsupported model_type 'llama'; supported: gemma3_text"),
        ("truncated", "truncated or corrupt"),
        ("corrupt", "truncated or corrupt"),
        ("shape", r"up_proj.weight: \(128, 64\) but config.json needs \(96, 64\)"),
        ("missing", r"missing tensors \['layers.1.mlp.up_proj.weight'\]"),
        ("unexpected", r"unexpected tensors \['layers.1.mlp.extra.weight'\]"),
    ],
)
def test_bad_inputs_fail_cleanly(how, message, qwen_dir, tmp_path, capsys):
    bad = _break(qwen_dir, tmp_path, how)
    out = tmp_path / "out"
    assert main(["convert", str(bad), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert re.search(message, err), err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_existing_destination_is_refused_unless_overwrite(qwen_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["convert", str(qwen_dir), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").read_text() == "precious"
    assert main(["convert", str(qwen_dir), str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "params").is_dir()


def test_tokenizer_files_travel_with_conversions(qwen_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    src = tmp_path / "src"
    shutil.copytree(qwen_dir, src)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        ["a tiny corpus for a tiny tokenizer"] * 10, trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"])
    )
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(src)
    assert main(["convert", str(src), str(tmp_path / "ckpt")]) == 0
    assert main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (
        reloaded("a tiny corpus").input_ids
        == transformers.AutoTokenizer.from_pretrained(src)("a tiny corpus").input_ids
    )
