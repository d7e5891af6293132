"""Planning (`bidirlm_jax.merge.plan`): which tensor of which model goes where, and every refusal before writing."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from bidirlm_jax.merge import MergeModel, MergeSpec, merge_checkpoints
from tests.merge.checkpoints import (
    assert_mean,
    bits,
    hf_template,
    merge,
    random,
    read,
    refused,
    run_cli,
    vl,
    vl_key,
    write,
)

# --- composition with specialists -------------------------------------------------------------------------


def test_composition_with_vl_specialist(tmp_path, ckpts, qwen):
    specialist = vl(tmp_path / "vl", qwen, seed=5)
    text = ckpts["float32", 0]
    out = merge(tmp_path, [specialist, text], [0.5, 0.5])
    merged, vl_t, text_t = read(out), read(specialist), read(text)
    assert set(merged) == set(vl_t)  # the base's key layout
    for key in [k for k in vl_t if k.startswith("model.visual.")]:
        assert np.array_equal(bits(merged[key]), bits(vl_t[key])) and merged[key].dtype == vl_t[key].dtype, key
    for key in text_t:
        assert_mean(merged[vl_key(key)], vl_t[vl_key(key)], text_t[key])
    assert json.loads((out / "config.json").read_text()) == json.loads((specialist / "config.json").read_text())


def test_composition_needs_the_towers_owner_as_base(tmp_path, ckpts, qwen, capsys):
    specialist = vl(tmp_path / "vl", qwen, seed=5)
    text = ckpts["float32", 0]
    out = tmp_path / "out"
    assert run_cli("--model", f"{text}=0.5", "--model", f"{specialist}=0.5", "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "model.visual.patch_embed.proj.weight" in err and "--base" in err and not out.exists()
    # excluding the tower drops it on purpose; the output takes the text model's layout
    args = ["--model", f"{text}=0.5", "--model", f"{specialist}=0.5", "--out", str(out)]
    assert run_cli(*args, "--exclude", r"^model\.visual\.") == 0
    assert set(read(out)) == set(read(text))


def test_gemma3_multimodal_layouts_detected_and_key_pattern(tmp_path, qwen, ckpts, capsys):
    config, shapes = qwen
    text = read(ckpts["float32", 0])
    old = {"language_model." + k: v for k, v in random(shapes, 7).items()}
    old_gemma = write(tmp_path / "old", old, {"model_type": "gemma3", "text_config": config})
    custom = write(
        tmp_path / "custom", {("enc." + k.removeprefix("model.")): v for k, v in random(shapes, 8).items()}, config
    )
    out = merge(tmp_path, [old_gemma, ckpts["float32", 0]], [0.5, 0.5])
    merged = read(out)
    for key in ("model.norm.weight", "model.layers.1.self_attn.k_norm.weight", "lm_head.weight"):
        assert_mean(merged["language_model." + key], old["language_model." + key], text[key])
    # a layout nobody knows: found only with an explicit regex
    out2 = tmp_path / "out2"
    models = ["--model", f"{ckpts['float32', 0]}=0.5", "--model", f"{custom}=0.5", "--out", str(out2)]
    assert run_cli(*models) == 2
    assert "--key-pattern" in capsys.readouterr().err and not out2.exists()
    assert run_cli(*models, "--key-pattern", f"{custom}=" + r"enc\.(lm_head\.weight)|enc\.(.+)") == 0
    merged, custom_t = read(out2), read(custom)
    for key in ("model.layers.1.mlp.up_proj.weight", "lm_head.weight"):
        assert_mean(merged[key], text[key], custom_t["enc." + key.removeprefix("model.")])


def test_tied_embeddings_contribute_their_head(tmp_path, qwen, capsys):
    config, shapes = qwen
    untied_t = random(shapes, 1)
    tied_t = {k: v for k, v in random(shapes, 2).items() if k != "lm_head.weight"}
    untied = write(tmp_path / "untied", untied_t, config)
    tied = write(tmp_path / "tied", tied_t, {**config, "tie_word_embeddings": True})
    merged = read(merge(tmp_path, [untied, tied], [0.5, 0.5]))
    assert_mean(merged["lm_head.weight"], untied_t["lm_head.weight"], tied_t["model.embed_tokens.weight"])
    # a tied base has no place for the other model's head: refused, not silently dropped
    out = tmp_path / "out2"
    assert run_cli("--model", f"{tied}=0.5", "--model", f"{untied}=0.5", "--out", str(out)) == 2
    assert "lm_head.weight" in capsys.readouterr().err and not out.exists()


# --- tensors that cannot be averaged are carried ------------------------------------------------------------


def test_non_floating_tensors_carried_when_identical(tmp_path, qwen, capsys):
    ids = np.arange(12, dtype=np.int64)
    a, b = vl(tmp_path / "a", qwen, 1, pos_ids=ids), vl(tmp_path / "b", qwen, 2, pos_ids=ids)
    result = merge_checkpoints(
        MergeSpec((MergeModel(str(a), 1), MergeModel(str(b), 1))), tmp_path / "out", progress=False
    )
    assert "model.visual.pos_ids" in result.carried and "model.visual.patch_embed.proj.weight" in result.merged
    assert np.array_equal(read(result.out)["model.visual.pos_ids"], ids)
    c = vl(tmp_path / "c", qwen, 3, pos_ids=ids[::-1].copy())
    assert run_cli("--model", f"{a}=1", "--model", f"{c}=1", "--out", str(tmp_path / "bad")) == 2
    assert "model.visual.pos_ids" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_buffers_we_cannot_average_are_carried(tmp_path, qwen, capsys):
    """Integer, bool and float64 buffers only the base has, or that every model holds identically, are carried
    byte for byte — in the backbone too; only one that differs between the models is refused, by name."""
    config, shapes = qwen
    shared = {"model.rotary_emb.inv_freq": np.linspace(1, 1e-4, 8), "model.flags": np.array([True, False])}
    base_only = {"model.embed_tokens.position_ids": np.arange(64, dtype=np.int64)}
    base = write(tmp_path / "base", {**random(shapes, 1), **shared, **base_only}, config)
    other = write(tmp_path / "other", {**random(shapes, 2), **shared}, config)
    result = merge_checkpoints(
        MergeSpec((MergeModel(str(base), 0.3), MergeModel(str(other), 0.7))), tmp_path / "out", progress=False
    )
    assert set(result.carried) == {*shared, *base_only}
    merged = read(result.out)
    for key, value in {**shared, **base_only}.items():
        assert merged[key].dtype == value.dtype and np.array_equal(bits(merged[key]), bits(value)), key
    differs = write(
        tmp_path / "differs", {**random(shapes, 3), **shared, "model.flags": np.array([True, True])}, config
    )
    err = refused(tmp_path, capsys, "--model", f"{base}=0.5", "--model", f"{differs}=0.5")
    assert "model.flags (bool) cannot be averaged" in err and "--exclude" in err


def test_fp8_tensors_carried_and_refused_by_name(tmp_path, qwen, capsys):
    config, shapes = qwen
    fp8 = np.dtype(ml_dtypes.float8_e4m3fn)
    scale = np.linspace(-2, 2, 16).astype(fp8)
    base = write(tmp_path / "base", {**random(shapes, 1), "model.scale": scale, "model.only": scale[:4]}, config)
    other = write(tmp_path / "other", {**random(shapes, 2), "model.scale": scale}, config)
    result = merge_checkpoints(
        MergeSpec((MergeModel(str(base), 0.5), MergeModel(str(other), 0.5))), tmp_path / "out", progress=False
    )
    assert {"model.scale", "model.only"} <= set(result.carried)
    assert np.array_equal(bits(read(result.out)["model.scale"]), bits(scale))
    differs = write(tmp_path / "differs", {**random(shapes, 3), "model.scale": scale[::-1].copy()}, config)
    err = refused(tmp_path, capsys, "--model", f"{base}=0.5", "--model", f"{differs}=0.5")
    assert "model.scale (float8_e4m3fn) cannot be averaged" in err


# --- bad inputs: a clear message, a non-zero exit, nothing written ------------------------------------------------


def test_refuses_mismatched_architectures(tmp_path, ckpts, capsys):
    config, shapes = hf_template("qwen3", num_hidden_layers=3)
    deeper = write(tmp_path / "deeper", random(shapes, 0), config)
    err = refused(tmp_path, capsys, "--model", f"{ckpts['float32', 0]}=0.5", "--model", f"{deeper}=0.5")
    assert "different architectures" in err and "num_hidden_layers" in err
    gconfig, gshapes = hf_template("gemma3")
    gemma = write(tmp_path / "gemma", random(gshapes, 0), gconfig)  # same sizes as the Qwen3: only its tensors differ
    err = refused(tmp_path, capsys, "--model", f"{ckpts['float32', 0]}=0.5", "--model", f"{gemma}=0.5")
    assert "different architectures" in err and "pre_feedforward_layernorm" in err


def test_refuses_shape_mismatch_unless_excluded(tmp_path, qwen, capsys):
    a, b = vl(tmp_path / "a", qwen, 1, tower_width=32), vl(tmp_path / "b", qwen, 2, tower_width=16)
    err = refused(tmp_path, capsys, "--model", f"{a}=0.5", "--model", f"{b}=0.5")
    assert (
        "shapes differ" in err and "model.visual.patch_embed.proj.weight: (32, 3, 2, 4, 4) vs (16, 3, 2, 4, 4)" in err
    )
    assert "model.visual.blocks.0.attn.qkv.weight" in err and "--exclude" in err
    result = merge_checkpoints(
        MergeSpec((MergeModel(str(a), 0.5), MergeModel(str(b), 0.5)), exclude=("visual",)),
        tmp_path / "ok",
        progress=False,
    )
    assert {k for k in result.carried if "visual" in k} == {k for k in read(a) if "visual" in k}
    assert {k for _, k in result.dropped} == {k for k in read(b) if "visual" in k}


def test_refuses_different_vocabularies(tmp_path, ckpts, capsys):
    config, shapes = hf_template("qwen3", vocab_size=320)
    bigger = write(tmp_path / "bigger", random(shapes, 0), config)
    err = refused(tmp_path, capsys, "--model", f"{ckpts['float32', 0]}=0.5", "--model", f"{bigger}=0.5")
    assert "vocabulary sizes differ" in err and "256" in err and "320" in err


def test_refuses_missing_model_path(tmp_path, ckpts, capsys):
    err = refused(tmp_path, capsys, "--model", f"{ckpts['float32', 0]}=0.5", "--model", f"{tmp_path / 'nope'}=0.5")
    assert "nope does not exist" in err


def test_refuses_zero_weight_sum(tmp_path, ckpts, capsys):
    models = ["--model", f"{ckpts['float32', 0]}=1", "--model", f"{ckpts['float32', 1]}=-1"]
    err = refused(tmp_path, capsys, *models)
    assert "sum to zero" in err and "--no-normalize" in err
    # unnormalised, the same weights are a valid task-vector difference
    assert run_cli(*models, "--no-normalize", "--out", str(tmp_path / "d")) == 0


def test_warns_about_gemma_norms_when_unnormalised(tmp_path):
    config, shapes = hf_template("gemma3")
    paths = [write(tmp_path / f"in{seed}", random(shapes, seed), config) for seed in range(2)]
    with pytest.warns(UserWarning, match=r"\(1 \+ w\)"):
        merge(tmp_path, paths, [1.0, 1.0], normalize=False)


def test_a_training_run_without_a_committed_step_is_refused(tmp_path, ckpts, capsys):
    """A run's directory (checkpoints/ + model/config.json) is read directly (tests/merge/test_runs.py); before its
    first committed step it has no weights, which the message says (it once named `bidirlm convert`, needed then)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "model").mkdir()
    (run / "model" / "config.json").write_text((ckpts["float32", 0] / "config.json").read_text())
    err = refused(tmp_path, capsys, "--model", f"{ckpts['float32', 0]}=0.5", "--model", f"{run}=0.5")
    assert f"training run {run} has no committed checkpoint yet" in err
