"""io/conversion.py through `bidirlm convert`: bit-exact round trips in every stored precision, tokenizer
files, pickled weights, and inputs it must refuse with exit 2, a message and nothing written."""

import json
import re
import shutil
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from bidirlm_jax.cli import main
from bidirlm_jax.io import conversion
from bidirlm_jax.io.hf import stored_dtypes
from bidirlm_jax.testing import reference
from tests.hf_files import assert_bit_exact


def _convert(*args) -> int:
    return main(["convert", *map(str, args)])


def _mixed_precision(src, out):
    """A copy of `src` with bf16 matrices and fp32 norms, as some published checkpoints are stored."""
    shutil.copytree(src, out)
    tensors = load_file(str(out / "model.safetensors"))
    mixed = {k: v if "norm" in k else v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    save_file(mixed, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("precision", ["fp32", "bf16", "mixed"])
def test_round_trips_keep_every_tensor_bit_exact(precision, tmp_path):
    """HF -> checkpoint -> HF and HF -> HF, with no --dtype, give back the source's bytes and dtypes."""
    model = reference.build(reference.gemma3_config(tie_word_embeddings=False))
    if precision == "mixed":
        src = _mixed_precision(reference.save(model, tmp_path / "fp32"), tmp_path / "src")
    else:
        src = reference.save(model, tmp_path / "src", torch.bfloat16 if precision == "bf16" else None)
    assert _convert(src, tmp_path / "ckpt") == 0
    assert _convert(tmp_path / "ckpt", tmp_path / "back") == 0
    assert _convert(src, tmp_path / "direct", "--to", "hf") == 0
    for out in (tmp_path / "back", tmp_path / "direct"):
        assert_bit_exact(src, out)
        assert json.loads((out / "config.json").read_text())["dtype"] == stored_dtypes(src)["embed_tokens.weight"]


def test_an_explicit_dtype_applies_to_every_tensor(qwen_dir, tmp_path):
    src = _mixed_precision(qwen_dir, tmp_path / "src")
    assert _convert(src, tmp_path / "ckpt") == 0
    for from_, out in ((src, tmp_path / "direct"), (tmp_path / "ckpt", tmp_path / "back")):
        assert _convert(from_, out, "--to", "hf", "--dtype", "float16") == 0
        assert set(stored_dtypes(out).values()) == {"float16"}


def test_pickled_weights_need_an_explicit_flag(qwen_dir, tmp_path, capsys):
    src = _pickled(qwen_dir, tmp_path / "bin")
    assert _convert(src, tmp_path / "out") == 2
    assert "--allow-pickle" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert _convert(src, tmp_path / "out", "--to", "hf", "--allow-pickle") == 0
    assert_bit_exact(qwen_dir, tmp_path / "out")


def test_pickled_weights_without_torch_ask_to_install_it(qwen_dir, tmp_path, capsys, monkeypatch):
    src = _pickled(qwen_dir, tmp_path / "bin")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    assert _convert(src, tmp_path / "out", "--allow-pickle") == 2
    err = capsys.readouterr().err
    assert "install torch (pip install torch) to read pytorch_model.bin" in err and "Traceback" not in err


def _pickled(src, out):
    shutil.copytree(src, out)
    tensors = load_file(str(out / "model.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, out / "pytorch_model.bin")
    (out / "model.safetensors").unlink()
    return out


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
    assert _convert(src, tmp_path / "ckpt") == 0
    assert _convert(tmp_path / "ckpt", tmp_path / "hf") == 0
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (
        reloaded("a tiny corpus").input_ids
        == transformers.AutoTokenizer.from_pretrained(src)("a tiny corpus").input_ids
    )


# --- bad inputs: a clear message, exit 2, nothing written -------------------------------------------


def _break(src, tmp_path, how):
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    weights = bad / "model.safetensors"
    config = json.loads((bad / "config.json").read_text())
    if how == "no-config":
        (bad / "config.json").unlink()
    elif how == "not-an-object":
        (bad / "config.json").write_text("[1, 2]")
    elif how == "zero-heads":
        (bad / "config.json").write_text(json.dumps({**config, "num_attention_heads": 0}))
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
        ("not-an-object", "config.json must hold a JSON object, got list"),
        ("zero-heads", "heads, KV heads, head_dim, hidden_size and layers must be positive"),
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
    assert _convert(bad, out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert re.search(message, err), err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_an_unusable_output_parent_is_refused_before_loading(qwen_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("a regular file")
    monkeypatch.setattr(conversion, "from_pretrained", lambda *a, **k: pytest.fail("loaded before checking"))
    assert _convert(qwen_dir, tmp_path / "file" / "out") == 2
    assert "is a file, not a directory" in capsys.readouterr().err


def test_existing_destination_is_refused_unless_overwrite(qwen_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert _convert(qwen_dir, out) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").read_text() == "precious"
    assert _convert(qwen_dir, out, "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "params").is_dir()
