"""`export_encoder` / `bidirlm export`: the directory loads as-is in transformers and sentence-transformers and
embeds as `encode` does (cosine >= 0.9999 and each normalised entry within 1e-4, fp32), both families, both padding sides, with and without an
instruction; bad sources fail cleanly."""

import json

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer

from bidirlm_jax.embed.encode import encode, query_prompt
from bidirlm_jax.errors import CheckpointError, ConfigError
from bidirlm_jax.io.hf_config import read_runtime
from bidirlm_jax.io.sentence_transformers import EncoderSettings, export_encoder, load_encoder, read_encoder_settings
from tests.encoders import MAX_LENGTH, TEXTS, make_encoder_src, run_cli

INSTRUCTION = "Given a question, retrieve passages that answer the question"


@pytest.fixture(scope="module", params=["qwen3", "gemma3"])
def exported(request, qwen_dir, gemma_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    src = make_encoder_src({"qwen3": qwen_dir, "gemma3": gemma_dir}[request.param], root / "src")
    dst = export_encoder(src, root / "encoder", max_length=MAX_LENGTH, prompts={"query": query_prompt(INSTRUCTION)})
    return src, dst


@pytest.fixture(scope="module")
def ours(exported):
    """Our embeddings of TEXTS from the exported directory: (plain, with the instruction)."""
    model, tokenizer, settings = load_encoder(exported[1])
    assert model.runtime.attention == "bidirectional"
    kw = dict(pooling=settings.pooling, max_length=settings.max_length, batch_size=4)
    return encode(model, tokenizer, TEXTS, **kw), encode(model, tokenizer, TEXTS, instruction=INSTRUCTION, **kw)


def _cosines(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def assert_same_embeddings(theirs, ours) -> None:
    """Same direction (cosine) and the same normalised vectors entry by entry. The models agree to 1e-4
    of the hidden states' scale (the parity contract with transformers), and a unit vector's scale is 1;
    a cosine of 0.9999 alone lets each entry move by up to 1.4e-2."""
    assert _cosines(theirs, ours).min() >= 0.9999
    unit = lambda x: np.asarray(x, np.float64) / np.linalg.norm(np.asarray(x, np.float64), axis=1, keepdims=True)
    np.testing.assert_allclose(unit(theirs), unit(ours), rtol=0, atol=1e-4)


def test_export_layout(exported):
    src, dst = exported
    modules = json.loads((dst / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    pooling = json.loads((dst / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and pooling["include_prompt"]
    assert json.loads((dst / "sentence_bert_config.json").read_text()) == {
        "max_seq_length": MAX_LENGTH,
        "do_lower_case": False,
    }
    st = json.loads((dst / "config_sentence_transformers.json").read_text())
    assert st["prompts"] == {"query": f"Instruct: {INSTRUCTION}\nQuery: "}
    assert st["similarity_fn_name"] == "cosine" and st["default_prompt_name"] is None
    config = json.loads((dst / "config.json").read_text())
    assert "auto_map" not in config and read_runtime(dst).attention == "bidirectional"
    assert AutoTokenizer.from_pretrained(dst).mask_token == "<mask>"
    assert (dst / "README.md").read_text().startswith("---\nlibrary_name: sentence-transformers")
    assert read_encoder_settings(dst) == EncoderSettings("mean", True, MAX_LENGTH, st["prompts"])
    assert read_encoder_settings(src) == EncoderSettings()  # a plain HF directory: the defaults


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_sentence_transformers_parity(exported, ours, padding_side):
    st = SentenceTransformer(str(exported[1]), device="cpu")
    st.tokenizer.padding_side = padding_side
    assert st.max_seq_length == MAX_LENGTH
    plain = st.encode(TEXTS, batch_size=4, convert_to_numpy=True)
    instructed = st.encode(TEXTS, batch_size=4, prompt_name="query", convert_to_numpy=True)
    assert_same_embeddings(plain, ours[0])
    assert_same_embeddings(instructed, ours[1])
    assert_same_embeddings(st.encode(TEXTS, prompt=query_prompt(INSTRUCTION), batch_size=4), ours[1])


def test_automodel_mean_pool_parity(exported, ours):
    """transformers alone (no sentence-transformers): AutoModel hidden states, masked mean, L2 norm."""
    tokenizer = AutoTokenizer.from_pretrained(exported[1])
    model = AutoModel.from_pretrained(exported[1]).eval()
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    assert_same_embeddings(pooled, ours[0])


@pytest.mark.parametrize("pooling", ["last", "first"])
def test_single_token_poolings_match(qwen_dir, tmp_path, pooling):
    src = make_encoder_src(qwen_dir, tmp_path / "src")
    dst = export_encoder(src, tmp_path / "encoder", pooling=pooling, max_length=MAX_LENGTH)
    model, tokenizer, settings = load_encoder(dst)
    assert settings.pooling == pooling
    expected = encode(model, tokenizer, TEXTS, pooling=pooling, max_length=MAX_LENGTH, batch_size=4)
    st = SentenceTransformer(str(dst), device="cpu")
    for side in ("right", "left"):
        st.tokenizer.padding_side = side
        assert_same_embeddings(st.encode(TEXTS, batch_size=4), expected)


def test_a_first_pooling_export_pads_right_for_every_sentence_transformers(qwen_dir, tmp_path):
    """sentence-transformers 5.0-5.4 pool `cls` at position 0 whatever the padding side: the export pads
    right, so that position (what those releases read) is the first real token, from a left-padding source."""
    src = make_encoder_src(qwen_dir, tmp_path / "src")
    config = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
    mean = export_encoder(src, tmp_path / "mean", max_length=MAX_LENGTH)
    assert AutoTokenizer.from_pretrained(mean).padding_side == "left"  # other poolings keep the source's
    dst = export_encoder(src, tmp_path / "first", pooling="first", max_length=MAX_LENGTH)
    assert json.loads((dst / "tokenizer_config.json").read_text())["padding_side"] == "right"
    model, tokenizer, settings = load_encoder(dst)
    expected = encode(model, tokenizer, TEXTS, pooling="first", max_length=MAX_LENGTH, batch_size=len(TEXTS))

    st = SentenceTransformer(str(dst), device="cpu")
    assert st.tokenizer.padding_side == "right"
    features = st.tokenize(TEXTS)
    assert len(set(features["attention_mask"].sum(1).tolist())) > 1  # padded: the side matters
    with torch.no_grad():
        position_0 = st[0](features)["token_embeddings"][:, 0]  # sentence-transformers 5.0-5.4's `cls`
    pooled = torch.nn.functional.normalize(position_0, dim=-1).numpy()
    # torch vs JAX in fp32 on unit vectors: a 64-wide reduction rounds within 64 × 1.19e-7 ≈ 7.6e-6 (seen: 2.8e-7)
    np.testing.assert_allclose(pooled, expected, atol=1e-5)


def test_bad_sources_write_nothing(qwen_dir, tmp_path):
    not_model = tmp_path / "notes"
    not_model.mkdir()
    (not_model / "readme.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a model directory"):
        export_encoder(not_model, tmp_path / "out")
    with pytest.raises(ConfigError, match="holds no tokenizer.*copy the base model's tokenizer"):
        export_encoder(qwen_dir, tmp_path / "out")  # the conftest directory has no tokenizer
    with pytest.raises(ConfigError, match="pooling"):
        export_encoder(qwen_dir, tmp_path / "out", pooling="max")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]  # nothing written, no temporary left


def test_export_cli(exported, tmp_path, capsys):
    src, _ = exported
    out = tmp_path / "enc"
    argv = ["export", src, out, "--max-length", 32, "--instruction", "find it", "--pooling", "last"]
    assert run_cli(argv) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert read_encoder_settings(out) == EncoderSettings("last", True, 32, {"query": "Instruct: find it\nQuery: "})
    assert run_cli(["export", src, out]) == 2
    assert "already exists" in capsys.readouterr().err
    assert run_cli(["export", src, out, "--no-normalize", "--overwrite"]) == 0
    assert not read_encoder_settings(out).normalize
    assert not (out / "2_Normalize").exists()


def test_export_from_a_checkpoint_and_in_another_dtype(qwen_dir, tmp_path):
    from safetensors.numpy import load_file

    from bidirlm_jax.io.conversion import convert

    src = make_encoder_src(qwen_dir, tmp_path / "src")
    checkpoint = convert(src, tmp_path / "checkpoint")  # orbax params + config + tokenizer files
    from_hf = load_file(export_encoder(src, tmp_path / "a") / "model.safetensors")
    from_checkpoint = load_file(export_encoder(checkpoint, tmp_path / "b") / "model.safetensors")
    assert from_hf.keys() == from_checkpoint.keys()
    for key, value in from_hf.items():
        np.testing.assert_array_equal(value, from_checkpoint[key])
    half = export_encoder(src, tmp_path / "c", dtype="bfloat16")
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_encoder(half)[0].runtime.attention == "bidirectional"
