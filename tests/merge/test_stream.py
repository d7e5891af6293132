"""The streamed merge (`merge_checkpoints`, `bidirlm merge`): numpy references, bit-exactness, what the output
holds and that it loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from bidirlm_jax.io.shards import INDEX_FILE
from bidirlm_jax.merge import MergeModel, MergeSpec, linear_merge, merge_checkpoints
from tests.merge.checkpoints import BF16, bits, hf_template, merge, random, read, run_cli, write

# --- the merge equals a numpy reference ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "weights,normalize",
    [([0.5, 0.5], True), ([0.3, 0.7], True), ([1.0, 2.0, 3.0], True), ([0.6, 0.9, -0.2], False), ([0.3, 0.7], False)],
)
def test_matches_numpy_reference(tmp_path, ckpts, dtype, weights, normalize):
    paths = [ckpts[dtype, i] for i in range(len(weights))]
    out = merge(tmp_path, paths, weights, normalize=normalize)
    inputs = [read(p) for p in paths]
    merged = read(out)
    assert set(merged) == set(inputs[0])
    w = np.asarray(weights, np.float64)
    divisor = w.sum() if normalize else 1.0
    for key, value in merged.items():
        ref = sum(wi * x[key].astype(np.float64) for wi, x in zip(w, inputs)) / divisor
        magnitude = np.max([np.abs(x[key].astype(np.float64)) for x in inputs], axis=0) * np.abs(w).sum() / abs(divisor)
        assert value.dtype == np.dtype(BF16 if dtype == "bfloat16" else np.float32), key
        # float32 accumulation: off by a few float32 ulps of the inputs; bf16 output: then rounded to the
        # nearest bf16, i.e. within half a bf16 ulp (8 significant bits) of the exact value
        half_ulp = np.ldexp(1.0, np.frexp(ref)[1] - 9) if dtype == "bfloat16" else 0.0
        error = np.abs(value.astype(np.float64) - ref)
        assert np.all(error <= 2**-21 * magnitude + half_ulp), key


@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.3, 0.7], [0.1, 0.2, 0.7]])
def test_model_merged_with_itself_is_bit_exact(tmp_path, ckpts, weights):
    path = ckpts["float32", 0]
    out = merge(tmp_path, [path] * len(weights), weights)
    original, merged = read(path), read(out)
    assert set(merged) == set(original)
    for key in original:
        assert np.array_equal(bits(merged[key]), bits(original[key])), key


def test_out_dtype_and_record(tmp_path, ckpts):
    out = merge(tmp_path, [ckpts["bfloat16", 0], ckpts["bfloat16", 1]], [0.3, 0.7], out_dtype="float32")
    merged = read(out)
    assert all(v.dtype == np.float32 for v in merged.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    record = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert record == {
        "merge_method": "linear",
        "base_model": str(ckpts["bfloat16", 0]),
        "models": [
            {"model": str(ckpts["bfloat16", 0]), "parameters": {"weight": 0.3}},
            {"model": str(ckpts["bfloat16", 1]), "parameters": {"weight": 0.7}},
        ],
        "parameters": {"normalize": True},
        "dtype": "float32",
        "out_dtype": "float32",
    }
    # the base's tokenizer travels with the output
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).tokenize("merge the base") == AutoTokenizer.from_pretrained(
        ckpts["bfloat16", 0]
    ).tokenize("merge the base")


def test_pieces_span_tensors_around_carried_ones(tmp_path, ckpts):
    """Small pieces pack several tensors and split others; a carried tensor in between keeps its place."""
    a, b = ckpts["float32", 0], ckpts["float32", 1]
    spec = MergeSpec((MergeModel(str(a), 0.3), MergeModel(str(b), 0.7)), exclude=(r"layers\.0\.mlp\.up_proj",))
    result = merge_checkpoints(spec, tmp_path / "out", progress=False, chunk_elements=1000)
    assert result.carried == ("model.layers.0.mlp.up_proj.weight",)
    merged, ta, tb = read(result.out), read(a), read(b)
    assert np.array_equal(
        bits(merged["model.layers.0.mlp.up_proj.weight"]), bits(ta["model.layers.0.mlp.up_proj.weight"])
    )
    in_memory = linear_merge([ta, tb], [0.3, 0.7])
    for key in result.merged:
        assert np.array_equal(bits(merged[key]), bits(np.asarray(in_memory[key]))), key


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("weights,normalize", [([0.3, 0.7], True), ([0.2, 0.5, 0.3], True), ([0.6, 0.9, -0.2], False)])
def test_in_memory_equals_streaming(tmp_path, ckpts, dtype, weights, normalize):
    paths = [ckpts[dtype, i] for i in range(len(weights))]
    streamed = read(merge(tmp_path, paths, weights, normalize=normalize))
    in_memory = linear_merge([read(p) for p in paths], weights, normalize=normalize)
    assert set(in_memory) == set(streamed)
    for key, value in in_memory.items():
        assert np.array_equal(bits(np.asarray(value)), bits(streamed[key])), key


# --- what travels with the output ----------------------------------------------------------------------------


def test_sentence_transformers_directory_keeps_its_modules(tmp_path, qwen, ckpts):
    """The base's subdirectories (a Pooling module) travel with the output; weights in them do not."""
    config, shapes = qwen
    st = write(tmp_path / "st", random(shapes, 4), config)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (st / "modules.json").write_text(json.dumps(modules))
    (st / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))
    (st / "1_Pooling").mkdir()
    (st / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64, "pooling_mode": "mean"}))
    (st / "onnx").mkdir()
    (st / "onnx" / "model.onnx").write_bytes(b"the base's weights")
    (st / "onnx" / "notes.txt").write_text("kept")
    (st / ".cache").mkdir()
    (st / ".cache" / "lock").write_text("")
    with pytest.warns(UserWarning, match=r"onnx/model\.onnx"):
        out = merge(tmp_path, [st, ckpts["float32", 0]], [0.5, 0.5])
    for rel in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json", "onnx/notes.txt"):
        assert (out / rel).read_bytes() == (st / rel).read_bytes(), rel
    assert not (out / "onnx" / "model.onnx").exists() and not (out / ".cache").exists()


def test_reads_pickled_inputs_only_when_allowed(tmp_path, qwen, ckpts, capsys):
    import torch

    config, shapes = qwen
    tensors = random(shapes, 6)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(config))
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, pickled / "pytorch_model.bin")
    args = ["--model", f"{ckpts['float32', 0]}=0.5", "--model", f"{pickled}=0.5", "--out", str(tmp_path / "out")]
    assert run_cli(*args) == 2
    err = capsys.readouterr().err
    assert "--allow-pickle" in err and "Traceback" not in err and not (tmp_path / "out").exists()
    assert run_cli(*args, "--allow-pickle") == 0
    merged, text = read(tmp_path / "out"), read(ckpts["float32", 0])
    expected = linear_merge([text, tensors], [0.5, 0.5])
    assert set(merged) == set(text)
    for key in merged:
        assert np.array_equal(bits(merged[key]), bits(np.asarray(expected[key]))), key


# --- the output loads ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_output_loads_in_transformers_and_from_pretrained(tmp_path, family):
    import torch
    import transformers

    import bidirlm_jax

    overrides = {"attention_bias": True} if family == "qwen3" else {}  # biases: dropped by mergekit's templates
    config, shapes = hf_template(family, **overrides)
    paths = [write(tmp_path / f"in{seed}", random(shapes, seed, scale=0.1), config) for seed in range(2)]
    out = tmp_path / "out"
    assert (
        run_cli(
            "--model", f"{paths[0]}=0.3", "--model", f"{paths[1]}=0.7", "--out", str(out), "--max-shard-size", "40KB"
        )
        == 0
    )
    assert (out / INDEX_FILE).is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    merged = read(out)
    if family == "qwen3":
        assert "model.layers.0.self_attn.q_proj.bias" in merged
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    state = model.state_dict()
    for key, value in merged.items():
        assert np.array_equal(state[key].numpy(), value), key

    ours = bidirlm_jax.from_pretrained(out)
    ids = np.array([[1, 5, 9, 3, 7, 2, 11, 4, 6, 8, 10, 12]])
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(ids).logits), ref, rtol=1e-4, atol=1e-4)  # parity contract, fp32


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_output_attention_mode(tmp_path, family):
    import transformers

    config, shapes = hf_template(family)
    paths = [write(tmp_path / f"in{seed}", random(shapes, seed), config) for seed in range(2)]
    out = tmp_path / "out"
    args = ["--model", f"{paths[0]}=0.5", "--model", f"{paths[1]}=0.5", "--out", str(out)]
    assert run_cli(*args, "--attention", "bidirectional") == 0
    written = json.loads((out / "config.json").read_text())
    loaded = transformers.AutoConfig.from_pretrained(out)
    if family == "qwen3":
        assert written["is_causal"] is False
    else:
        assert written["use_bidirectional_attention"] is True and written["sliding_window"] == config["sliding_window"]
        assert loaded.use_bidirectional_attention
    record = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert record["bidirlm"] == {"attention": "bidirectional"}


def test_refuses_existing_output(tmp_path, ckpts, capsys):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["--model", f"{ckpts['float32', 0]}=0.5", "--model", f"{ckpts['float32', 1]}=0.5", "--out", str(out)]
    assert run_cli(*args) == 2
    assert "already exists" in capsys.readouterr().err and [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (
        run_cli(*args, "--overwrite") == 0 and not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    )
