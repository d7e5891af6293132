"""Linear merge (issue 4): numpy references, bit-exactness, composition, loading, bad inputs, YAML."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

from bidirlm_jax import cli
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.shards import INDEX_FILE, ShardReader
from bidirlm_jax.merge import MergeModel, MergeSpec, interpolate, linear_merge, merge_checkpoints

BF16 = np.dtype(ml_dtypes.bfloat16)
QWEN = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
)


# --- checkpoints -------------------------------------------------------------------------------------


def _hf_template(family: str, **overrides) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """config.json and {key: shape} of a tiny transformers model (built once from its config, no hub)."""
    import torch
    import transformers

    torch.manual_seed(0)
    if family == "qwen3":
        config = transformers.Qwen3Config(**{**QWEN, **overrides})
        model = transformers.Qwen3ForCausalLM(config)
    else:
        config = transformers.Gemma3TextConfig(
            **{**QWEN, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"], **overrides}
        )
        model = transformers.Gemma3ForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")  # what save_pretrained writes for tied embeddings
    return {**json.loads(config.to_json_string()), "architectures": [type(model).__name__]}, shapes


def _write(path: Path, tensors: dict[str, np.ndarray], config: dict | None, *, shards: int = 1) -> Path:
    """A checkpoint directory as transformers writes it: config.json + one file, or shards + index."""
    path.mkdir(parents=True)
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    keys = list(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        save_file(part, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return path


def _random(
    shapes: dict[str, tuple[int, ...]], seed: int, dtype=np.float32, scale: float = 1.0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(s, dtype=np.float32)).astype(dtype) for k, s in shapes.items()}


def _tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        ["merge the base and the encoder"] * 4, trainers.BpeTrainer(vocab_size=40, special_tokens=["<unk>"])
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)


def _read(path: Path) -> dict[str, np.ndarray]:
    reader = ShardReader(path)
    return {k: reader.get(k) for k in reader.keys()}


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(np.uint8)


def _assert_mean(actual, *parts) -> None:
    """`actual` is the float32 average of `parts` (to float32 rounding)."""
    ref = sum(np.asarray(p, np.float64) for p in parts) / len(parts)
    np.testing.assert_allclose(np.asarray(actual, np.float64), ref, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def qwen() -> tuple[dict, dict]:
    return _hf_template("qwen3")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, qwen) -> dict[tuple[str, int], Path]:
    """Three random tiny Qwen3 checkpoints per dtype (the first with a tokenizer, the second sharded)."""
    config, shapes = qwen
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for dtype in ("float32", "bfloat16"):
        for seed in range(3):
            tensors = _random(shapes, seed, BF16 if dtype == "bfloat16" else np.float32)
            path = _write(root / f"{dtype}-{seed}", tensors, {**config, "dtype": dtype}, shards=2 if seed == 1 else 1)
            if seed == 0:
                _tokenizer(path)
            out[dtype, seed] = path
    return out


def _merge(tmp_path: Path, paths, weights, **kw) -> Path:
    spec = MergeSpec(tuple(MergeModel(str(p), w) for p, w in zip(paths, weights)), **kw)
    return merge_checkpoints(spec, tmp_path / "out", progress=False).out


def _cli(*args: str) -> int:
    return cli.main(["merge", "--no-progress", *args])


# --- the merge equals a numpy reference ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "weights,normalize",
    [([0.5, 0.5], True), ([0.3, 0.7], True), ([1.0, 2.0, 3.0], True), ([0.6, 0.9, -0.2], False), ([0.3, 0.7], False)],
)
def test_matches_numpy_reference(tmp_path, ckpts, dtype, weights, normalize):
    paths = [ckpts[dtype, i] for i in range(len(weights))]
    out = _merge(tmp_path, paths, weights, normalize=normalize)
    inputs = [_read(p) for p in paths]
    merged = _read(out)
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
    out = _merge(tmp_path, [path] * len(weights), weights)
    original, merged = _read(path), _read(out)
    assert set(merged) == set(original)
    for key in original:
        assert np.array_equal(_bits(merged[key]), _bits(original[key])), key


def test_out_dtype_and_record(tmp_path, ckpts):
    out = _merge(tmp_path, [ckpts["bfloat16", 0], ckpts["bfloat16", 1]], [0.3, 0.7], out_dtype="float32")
    merged = _read(out)
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
    merged, ta, tb = _read(result.out), _read(a), _read(b)
    assert np.array_equal(
        _bits(merged["model.layers.0.mlp.up_proj.weight"]), _bits(ta["model.layers.0.mlp.up_proj.weight"])
    )
    in_memory = linear_merge([ta, tb], [0.3, 0.7])
    for key in result.merged:
        assert np.array_equal(_bits(merged[key]), _bits(np.asarray(in_memory[key]))), key


# --- in memory -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("weights,normalize", [([0.3, 0.7], True), ([0.2, 0.5, 0.3], True), ([0.6, 0.9, -0.2], False)])
def test_in_memory_equals_streaming(tmp_path, ckpts, dtype, weights, normalize):
    paths = [ckpts[dtype, i] for i in range(len(weights))]
    streamed = _read(_merge(tmp_path, paths, weights, normalize=normalize))
    in_memory = linear_merge([_read(p) for p in paths], weights, normalize=normalize)
    assert set(in_memory) == set(streamed)
    for key, value in in_memory.items():
        assert np.array_equal(_bits(np.asarray(value)), _bits(streamed[key])), key


def test_in_memory_jit_sharded_pytrees():
    mesh = jax.make_mesh((8,), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    rng = np.random.default_rng(0)

    def tree(seed_shift):
        leaves = [rng.standard_normal(s, dtype=np.float32) + seed_shift for s in [(16, 8), (8,), (24, 4)]]
        return {
            "w": jax.device_put(leaves[0], sharding),
            "layers": [(jnp.asarray(leaves[1], jnp.bfloat16), None)],
            "head": {"b": jax.device_put(leaves[2], sharding)},
        }

    a, b = tree(0.0), tree(1.0)
    merged = jax.jit(interpolate)(a, b, 0.25)  # alpha traced
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(a)
    for leaf in (merged["w"], merged["head"]["b"]):  # still split over the 8 devices, not gathered
        assert leaf.sharding.is_equivalent_to(sharding, 2) and len(leaf.addressable_shards) == 8
    assert merged["layers"][0][0].dtype == jnp.bfloat16
    for m, x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(a), jax.tree.leaves(b)):
        ref = 0.75 * np.asarray(x, np.float64) + 0.25 * np.asarray(y, np.float64)
        np.testing.assert_allclose(
            np.asarray(m, np.float64), ref, rtol=1e-2 if m.dtype == jnp.bfloat16 else 1e-6, atol=1e-6
        )
    assert all(
        np.array_equal(np.asarray(m), np.asarray(x))
        for m, x in zip(jax.tree.leaves(interpolate(a, b, 0.0)), jax.tree.leaves(a))
    )
    three = jax.jit(lambda ts: linear_merge(ts, [1.0, 1.0, 2.0], dtype=jnp.float32))([a, b, b])
    ref = (np.asarray(a["w"]) + 3 * np.asarray(b["w"])) / 4
    np.testing.assert_allclose(np.asarray(three["w"]), ref, rtol=1e-6, atol=1e-6)
    assert three["layers"][0][0].dtype == jnp.float32


def test_in_memory_nnx_state():
    from flax import nnx

    def state(seed):
        return nnx.split(nnx.Linear(4, 3, rngs=nnx.Rngs(seed)))

    graphdef, sa = state(0)
    _, sb = state(1)
    model = nnx.merge(graphdef, interpolate(sa, sb, 0.5))
    _assert_mean(model.kernel[...], sa["kernel"][...], sb["kernel"][...])


def test_in_memory_refuses_bad_trees():
    a = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
    with pytest.raises(ConfigError, match=r"\['c'\]"):
        linear_merge([a, {"w": jnp.ones((2, 3)), "c": jnp.ones(3)}], [0.5, 0.5])
    with pytest.raises(ConfigError, match=r"\['w'\].*\(2, 3\) vs \(3, 2\)"):
        linear_merge([a, {"w": jnp.ones((3, 2)), "b": jnp.ones(3)}], [0.5, 0.5])
    with pytest.raises(ConfigError, match=r"(?s)floating.*\['step'\]"):
        linear_merge([{"step": jnp.ones(2, jnp.int32)}] * 2, [0.5, 0.5])
    with pytest.raises(ConfigError, match="sum to zero"):
        linear_merge([a, a], [1.0, -1.0])


# --- composition with specialists -------------------------------------------------------------------------


def _vl_key(key: str) -> str:
    return key if key == "lm_head.weight" else "model.language_model." + key.removeprefix("model.")


def _vl(path: Path, qwen, seed: int, *, tower_width: int = 32, pos_ids=None) -> Path:
    """A Qwen3-VL-style checkpoint: the text backbone under `model.language_model.`, plus a vision tower."""
    config, shapes = qwen
    text = _random(shapes, seed)
    tensors = {_vl_key(k): v for k, v in text.items()}
    rng = np.random.default_rng(100 + seed)
    tower = {
        "model.visual.patch_embed.proj.weight": rng.standard_normal((tower_width, 3, 2, 4, 4), dtype=np.float32),
        "model.visual.blocks.0.attn.qkv.weight": rng.standard_normal((3 * tower_width, tower_width), dtype=np.float32),
        "model.visual.merger.linear_fc2.weight": rng.standard_normal((64, tower_width), dtype=np.float32).astype(BF16),
    }
    if pos_ids is not None:
        tower["model.visual.pos_ids"] = pos_ids
    vl_config = {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "text_config": {**config, "model_type": "qwen3_vl_text"},
        "vision_config": {"hidden_size": tower_width},
        "image_token_id": 151655,
    }
    return _write(path, {**tensors, **tower}, vl_config)


def test_composition_with_vl_specialist(tmp_path, ckpts, qwen):
    vl = _vl(tmp_path / "vl", qwen, seed=5)
    text = ckpts["float32", 0]
    out = _merge(tmp_path, [vl, text], [0.5, 0.5])
    merged, vl_t, text_t = _read(out), _read(vl), _read(text)
    assert set(merged) == set(vl_t)  # the base's key layout
    for key in [k for k in vl_t if k.startswith("model.visual.")]:
        assert np.array_equal(_bits(merged[key]), _bits(vl_t[key])) and merged[key].dtype == vl_t[key].dtype, key
    for key in text_t:
        _assert_mean(merged[_vl_key(key)], vl_t[_vl_key(key)], text_t[key])
    assert json.loads((out / "config.json").read_text()) == json.loads((vl / "config.json").read_text())


def test_composition_needs_the_towers_owner_as_base(tmp_path, ckpts, qwen, capsys):
    vl = _vl(tmp_path / "vl", qwen, seed=5)
    text = ckpts["float32", 0]
    out = tmp_path / "out"
    assert _cli("--model", f"{text}=0.5", "--model", f"{vl}=0.5", "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "model.visual.patch_embed.proj.weight" in err and "--base" in err and not out.exists()
    # excluding the tower drops it on purpose; the output takes the text model's layout
    assert (
        _cli("--model", f"{text}=0.5", "--model", f"{vl}=0.5", "--out", str(out), "--exclude", r"^model\.visual\.") == 0
    )
    assert set(_read(out)) == set(_read(text))


def test_gemma3_multimodal_layouts_detected_and_key_pattern(tmp_path, qwen, ckpts, capsys):
    config, shapes = qwen
    text = _read(ckpts["float32", 0])
    old = {"language_model." + k: v for k, v in _random(shapes, 7).items()}
    old_gemma = _write(tmp_path / "old", old, {"model_type": "gemma3", "text_config": config})
    custom = _write(
        tmp_path / "custom", {("enc." + k.removeprefix("model.")): v for k, v in _random(shapes, 8).items()}, config
    )
    out = _merge(tmp_path, [old_gemma, ckpts["float32", 0]], [0.5, 0.5])
    merged = _read(out)
    for key in ("model.norm.weight", "model.layers.1.self_attn.k_norm.weight", "lm_head.weight"):
        _assert_mean(merged["language_model." + key], old["language_model." + key], text[key])
    # a layout nobody knows: found only with an explicit regex
    out2 = tmp_path / "out2"
    models = ["--model", f"{ckpts['float32', 0]}=0.5", "--model", f"{custom}=0.5", "--out", str(out2)]
    assert _cli(*models) == 2
    assert "--key-pattern" in capsys.readouterr().err and not out2.exists()
    assert _cli(*models, "--key-pattern", f"{custom}=" + r"enc\.(lm_head\.weight)|enc\.(.+)") == 0
    merged, custom_t = _read(out2), _read(custom)
    for key in ("model.layers.1.mlp.up_proj.weight", "lm_head.weight"):
        _assert_mean(merged[key], text[key], custom_t["enc." + key.removeprefix("model.")])


def test_tied_embeddings_contribute_their_head(tmp_path, qwen, capsys):
    config, shapes = qwen
    untied_t = _random(shapes, 1)
    tied_t = {k: v for k, v in _random(shapes, 2).items() if k != "lm_head.weight"}
    untied = _write(tmp_path / "untied", untied_t, config)
    tied = _write(tmp_path / "tied", tied_t, {**config, "tie_word_embeddings": True})
    merged = _read(_merge(tmp_path, [untied, tied], [0.5, 0.5]))
    _assert_mean(merged["lm_head.weight"], untied_t["lm_head.weight"], tied_t["model.embed_tokens.weight"])
    # a tied base has no place for the other model's head: refused, not silently dropped
    out = tmp_path / "out2"
    assert _cli("--model", f"{tied}=0.5", "--model", f"{untied}=0.5", "--out", str(out)) == 2
    assert "lm_head.weight" in capsys.readouterr().err and not out.exists()


def test_non_floating_tensors_carried_when_identical(tmp_path, qwen, capsys):
    ids = np.arange(12, dtype=np.int64)
    a, b = _vl(tmp_path / "a", qwen, 1, pos_ids=ids), _vl(tmp_path / "b", qwen, 2, pos_ids=ids)
    result = merge_checkpoints(
        MergeSpec((MergeModel(str(a), 1), MergeModel(str(b), 1))), tmp_path / "out", progress=False
    )
    assert "model.visual.pos_ids" in result.carried and "model.visual.patch_embed.proj.weight" in result.merged
    assert np.array_equal(_read(result.out)["model.visual.pos_ids"], ids)
    c = _vl(tmp_path / "c", qwen, 3, pos_ids=ids[::-1].copy())
    assert _cli("--model", f"{a}=1", "--model", f"{c}=1", "--out", str(tmp_path / "bad")) == 2
    assert "model.visual.pos_ids" in capsys.readouterr().err and not (tmp_path / "bad").exists()


# --- the output loads ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_output_loads_in_transformers_and_from_pretrained(tmp_path, family):
    import torch
    import transformers

    import bidirlm_jax

    overrides = {"attention_bias": True} if family == "qwen3" else {}  # biases: dropped by mergekit's templates
    config, shapes = _hf_template(family, **overrides)
    paths = [_write(tmp_path / f"in{seed}", _random(shapes, seed, scale=0.1), config) for seed in range(2)]
    out = tmp_path / "out"
    assert (
        _cli("--model", f"{paths[0]}=0.3", "--model", f"{paths[1]}=0.7", "--out", str(out), "--max-shard-size", "40KB")
        == 0
    )
    assert (out / INDEX_FILE).is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    merged = _read(out)
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
    np.testing.assert_allclose(np.asarray(ours(ids).logits), ref, rtol=1e-4, atol=1e-4)


def test_warns_about_gemma_norms_when_unnormalised(tmp_path):
    config, shapes = _hf_template("gemma3")
    paths = [_write(tmp_path / f"in{seed}", _random(shapes, seed), config) for seed in range(2)]
    with pytest.warns(UserWarning, match=r"\(1 \+ w\)"):
        _merge(tmp_path, paths, [1.0, 1.0], normalize=False)


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_output_attention_mode(tmp_path, family):
    import transformers

    config, shapes = _hf_template(family)
    paths = [_write(tmp_path / f"in{seed}", _random(shapes, seed), config) for seed in range(2)]
    out = tmp_path / "out"
    assert (
        _cli(
            "--model",
            f"{paths[0]}=0.5",
            "--model",
            f"{paths[1]}=0.5",
            "--out",
            str(out),
            "--attention",
            "bidirectional",
        )
        == 0
    )
    written = json.loads((out / "config.json").read_text())
    loaded = transformers.AutoConfig.from_pretrained(out)
    if family == "qwen3":
        assert written["is_causal"] is False
    else:
        assert written["use_bidirectional_attention"] is True and written["sliding_window"] == config["sliding_window"]
        assert loaded.use_bidirectional_attention
    record = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert record["bidirlm"] == {"attention": "bidirectional"}


# --- bad inputs: a clear message, a non-zero exit, nothing written ------------------------------------------------


def _refused(tmp_path: Path, capsys, *args: str) -> str:
    out = tmp_path / "refused"
    assert _cli(*args, "--out", str(out)) == 2
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".refused")]  # no temp dirs left behind
    return capsys.readouterr().err


def test_refuses_mismatched_architectures(tmp_path, ckpts, capsys):
    config, shapes = _hf_template("qwen3", num_hidden_layers=3)
    deeper = _write(tmp_path / "deeper", _random(shapes, 0), config)
    err = _refused(tmp_path, capsys, "--model", f"{ckpts['float32', 0]}=0.5", "--model", f"{deeper}=0.5")
    assert "different architectures" in err and "num_hidden_layers" in err
    gconfig, gshapes = _hf_template("gemma3")
    gemma = _write(tmp_path / "gemma", _random(gshapes, 0), gconfig)  # same sizes as the Qwen3: only its tensors differ
    err = _refused(tmp_path, capsys, "--model", f"{ckpts['float32', 0]}=0.5", "--model", f"{gemma}=0.5")
    assert "different architectures" in err and "pre_feedforward_layernorm" in err


def test_refuses_shape_mismatch_unless_excluded(tmp_path, qwen, capsys):
    a, b = _vl(tmp_path / "a", qwen, 1, tower_width=32), _vl(tmp_path / "b", qwen, 2, tower_width=16)
    err = _refused(tmp_path, capsys, "--model", f"{a}=0.5", "--model", f"{b}=0.5")
    assert (
        "shapes differ" in err and "model.visual.patch_embed.proj.weight: (32, 3, 2, 4, 4) vs (16, 3, 2, 4, 4)" in err
    )
    assert "model.visual.blocks.0.attn.qkv.weight" in err and "--exclude" in err
    result = merge_checkpoints(
        MergeSpec((MergeModel(str(a), 0.5), MergeModel(str(b), 0.5)), exclude=("visual",)),
        tmp_path / "ok",
        progress=False,
    )
    assert {k for k in result.carried if "visual" in k} == {k for k in _read(a) if "visual" in k}
    assert {k for _, k in result.dropped} == {k for k in _read(b) if "visual" in k}


def test_refuses_different_vocabularies(tmp_path, ckpts, capsys):
    config, shapes = _hf_template("qwen3", vocab_size=320)
    bigger = _write(tmp_path / "bigger", _random(shapes, 0), config)
    err = _refused(tmp_path, capsys, "--model", f"{ckpts['float32', 0]}=0.5", "--model", f"{bigger}=0.5")
    assert "vocabulary sizes differ" in err and "256" in err and "320" in err


def test_refuses_missing_model_path(tmp_path, ckpts, capsys):
    err = _refused(tmp_path, capsys, "--model", f"{ckpts['float32', 0]}=0.5", "--model", f"{tmp_path / 'nope'}=0.5")
    assert "nope does not exist" in err


def test_refuses_zero_weight_sum(tmp_path, ckpts, capsys):
    models = ["--model", f"{ckpts['float32', 0]}=1", "--model", f"{ckpts['float32', 1]}=-1"]
    err = _refused(tmp_path, capsys, *models)
    assert "sum to zero" in err and "--no-normalize" in err
    # unnormalised, the same weights are a valid task-vector difference
    assert _cli(*models, "--no-normalize", "--out", str(tmp_path / "d")) == 0


def test_refuses_existing_output(tmp_path, ckpts, capsys):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["--model", f"{ckpts['float32', 0]}=0.5", "--model", f"{ckpts['float32', 1]}=0.5", "--out", str(out)]
    assert _cli(*args) == 2
    assert "already exists" in capsys.readouterr().err and [p.name for p in out.iterdir()] == ["keep.txt"]
    assert _cli(*args, "--overwrite") == 0 and not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


# --- mergekit YAML -----------------------------------------------------------------------------------------------


def test_mergekit_yaml_config(tmp_path, ckpts):
    from mergekit.config import MergeConfiguration

    a, b = ckpts["bfloat16", 0], ckpts["bfloat16", 1]
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        f"models:\n  - model: {a}\n    parameters:\n      weight: 0.3\n  - model: {b}\n    parameters:\n      weight: 0.7\n"
        "merge_method: linear\nparameters:\n  normalize: true\ndtype: float32\nout_dtype: bfloat16\n"
    )
    assert cli.main(["merge", "--config", str(recipe), "--out", str(tmp_path / "yaml"), "--no-progress"]) == 0
    from_flags = _merge(tmp_path, [a, b], [0.3, 0.7])
    yaml_out, flags_out = _read(tmp_path / "yaml"), _read(from_flags)
    assert all(np.array_equal(_bits(yaml_out[k]), _bits(flags_out[k])) for k in flags_out)
    record = (tmp_path / "yaml" / "mergekit_config.yml").read_text()
    MergeConfiguration.model_validate(yaml.safe_load(record))  # mergekit itself accepts the record
    # and running the record again reproduces the merge
    assert _cli("--config", str(tmp_path / "yaml" / "mergekit_config.yml"), "--out", str(tmp_path / "again")) == 0
    again = _read(tmp_path / "again")
    assert all(np.array_equal(_bits(again[k]), _bits(flags_out[k])) for k in flags_out)


def test_same_recipe_as_mergekit(tmp_path, ckpts):
    """mergekit runs the same YAML: equal bit for bit at 0.5/0.5, within one bf16 rounding at 0.3/0.7."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    a, b = ckpts["bfloat16", 0], ckpts["bfloat16", 2]
    for weights in ([0.5, 0.5], [0.3, 0.7]):
        recipe = tmp_path / f"{weights[0]}.yml"
        recipe.write_text(
            f"merge_method: linear\ndtype: bfloat16\nmodels:\n  - model: {a}\n    parameters: {{weight: {weights[0]}}}\n"
            f"  - model: {b}\n    parameters: {{weight: {weights[1]}}}\n"
        )
        ours, theirs = tmp_path / f"ours-{weights[0]}", tmp_path / f"theirs-{weights[0]}"
        assert cli.main(["merge", "--config", str(recipe), "--out", str(ours), "--no-progress"]) == 0
        config = MergeConfiguration.model_validate(yaml.safe_load(recipe.read_text()))
        run_merge(config, str(theirs), options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
        mine, mk, ta, tb = _read(ours), _read(theirs), _read(a), _read(b)
        assert set(mine) == set(mk)
        for key in mine:
            if weights == [0.5, 0.5]:
                assert np.array_equal(_bits(mine[key]), _bits(mk[key])), key
            else:  # one bf16 ulp, plus float32 rounding of the summands where they cancel
                x, y = mine[key].astype(np.float64), mk[key].astype(np.float64)
                magnitude = np.maximum(np.abs(ta[key].astype(np.float64)), np.abs(tb[key].astype(np.float64)))
                ulp = np.ldexp(1.0, np.frexp(np.maximum(abs(x), abs(y)))[1] - 8)
                assert np.all(np.abs(x - y) <= ulp + 2**-21 * magnitude), key


@pytest.mark.parametrize(
    "recipe,message",
    [
        ("merge_method: ties\nmodels:\n  - model: {a}\n", "merge_method 'ties'"),
        ("merge_method: linear\nmodels:\n  - model: {a}\n", "no parameters.weight"),
        ("merge_method: linear\nmodels:\n  - model: {a}\n    parameters:\n      weight: [0, 1]\n", "single number"),
        ("merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\nslerp_t: 1\n", "slerp_t"),
        (
            "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\ntokenizer:\n  source: union\n",
            "tokenizer",
        ),
    ],
)
def test_mergekit_yaml_refusals(tmp_path, ckpts, capsys, recipe, message):
    path = tmp_path / "recipe.yml"
    path.write_text(recipe.format(a=ckpts["float32", 0]))
    assert cli.main(["merge", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "o").exists()
