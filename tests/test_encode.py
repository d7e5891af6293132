"""`encode`: bucketed batches equal one text at a time, bidirectionality, instructions, truncation; `bidirlm embed`."""

import json
import logging

import numpy as np
import pytest
from flax import nnx

from bidirlm_jax.data.batching import bucket_lengths, tokenize
from bidirlm_jax.embed.encode import encode, encode_texts, query_prompt
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.hf import from_pretrained
from bidirlm_jax.io.sentence_transformers import load_encoder
from bidirlm_jax.io.tokenizer import load_tokenizer
from bidirlm_jax.testing.tolerance import fp32_tol
from tests.encoders import MAX_LENGTH, TEXTS, make_encoder_src, run_cli


@pytest.fixture(scope="module", params=["qwen3", "gemma3"])
def family_src(request, qwen_dir, gemma_dir, tmp_path_factory):
    source = {"qwen3": qwen_dir, "gemma3": gemma_dir}[request.param]
    return make_encoder_src(source, tmp_path_factory.mktemp(request.param) / "src")


@pytest.fixture(scope="module")
def qwen_src(qwen_dir, tmp_path_factory):
    return make_encoder_src(qwen_dir, tmp_path_factory.mktemp("qwen3-src") / "src")


def test_buckets():
    assert bucket_lengths(64) == (16, 32, 64)
    assert bucket_lengths(512) == (16, 32, 64, 96, 128, 192, 256, 384, 512)
    assert bucket_lengths(100) == (16, 32, 64, 96, 100)
    assert bucket_lengths(8) == (8,)


def test_bucketed_batches_equal_single_texts(family_src):
    """Sorting, bucket padding and row filling change nothing: a padded batch equals each text alone (llm2vec #68)."""
    model = from_pretrained(family_src, attention="bidirectional")
    tokenizer = load_tokenizer(family_src)
    batched = encode_texts(model, tokenizer, TEXTS, batch_size=4, max_length=MAX_LENGTH)
    single = np.stack([encode(model, tokenizer, [t], batch_size=1, max_length=MAX_LENGTH)[0] for t in TEXTS])
    assert batched.embeddings.shape == (len(TEXTS), model.config.hidden_size)
    assert batched.embeddings.dtype == np.float32
    # unit vectors (scale 1) whose hidden states went through 64-wide fp32 matmuls in batches of other shapes
    np.testing.assert_allclose(batched.embeddings, single, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched.embeddings, axis=1), 1.0, atol=fp32_tol(64))
    assert batched.num_truncated == 1
    assert len({tuple(np.round(e, 4)) for e in batched.embeddings}) == len(TEXTS)  # input order, distinct rows


def test_bidirectional_hidden_states_see_the_future(qwen_src):
    """Appending text changes the first tokens' states when bidirectional, never when causal; a left-padded row
    equals the text alone (RoPE positions shift, relative distances do not)."""
    tokenizer = load_tokenizer(qwen_src)
    short = tokenizer("the quick brown fox")["input_ids"]
    longer = tokenizer("the quick brown fox jumps over a lazy dog")["input_ids"]
    n, t = len(short), len(longer)
    assert longer[:n] == short
    ids = np.array([short + [0] * (t - n), longer, [0] * (t - n) + short])
    mask = np.array([[1] * n + [0] * (t - n), [1] * t, [0] * (t - n) + [1] * n])
    for attention, changes in (("bidirectional", True), ("causal", False)):
        hidden = np.asarray(_hidden(from_pretrained(qwen_src, attention=attention), ids, mask))
        assert bool(np.abs(hidden[0, :n] - hidden[1, :n]).max() > 1e-3) is changes, attention
        np.testing.assert_allclose(hidden[2, t - n :], hidden[0, :n], atol=1e-4)  # RoPE angles of other positions


@nnx.jit
def _hidden(model, ids, mask):
    return model.hidden_states(ids, mask)


def test_instruction_prefixes_every_text(qwen_src):
    model = from_pretrained(qwen_src, attention="bidirectional")
    tokenizer = load_tokenizer(qwen_src)
    texts = TEXTS[:3]
    ours = encode(model, tokenizer, texts, instruction="find the animal", max_length=MAX_LENGTH)
    manual = encode(model, tokenizer, [query_prompt("find the animal") + t for t in texts], max_length=MAX_LENGTH)
    plain = encode(model, tokenizer, texts, max_length=MAX_LENGTH)
    assert query_prompt("X") == "Instruct: X\nQuery: "
    np.testing.assert_array_equal(ours, manual)
    assert np.abs(ours - plain).max() > 1e-3


def test_truncation_is_counted_and_logged(qwen_src, caplog):
    model = from_pretrained(qwen_src, attention="bidirectional")
    tokenizer = load_tokenizer(qwen_src)
    with caplog.at_level(logging.WARNING, logger="bidirlm_jax.embed.encode"):
        result = encode_texts(model, tokenizer, TEXTS, batch_size=4, max_length=MAX_LENGTH)
    assert result.num_truncated == 1
    assert f"1 of {len(TEXTS)} texts were longer than {MAX_LENGTH} tokens" in caplog.text
    ids, truncated = tokenize(tokenizer, TEXTS, MAX_LENGTH)
    full = tokenizer(TEXTS[4])["input_ids"]
    assert truncated == 1 and len(full) > MAX_LENGTH and ids[4] == full[:MAX_LENGTH]  # cut as transformers cuts


def test_bad_arguments(qwen_src):
    model = from_pretrained(qwen_src, attention="bidirectional")
    tokenizer = load_tokenizer(qwen_src)
    assert encode(model, tokenizer, []).shape == (0, model.config.hidden_size)
    with pytest.raises(ConfigError, match="list of texts"):
        encode(model, tokenizer, "one string")
    with pytest.raises(ConfigError, match="pooling"):
        encode(model, tokenizer, ["a"], pooling="max")
    with pytest.raises(ConfigError, match="not a string"):
        encode(model, tokenizer, ["a", None])


def test_text_without_tokens_embeds_as_zeros(qwen_src):
    """A tokenizer that adds no special token (Qwen3's) turns "" into no token at all: zeros, never NaN."""

    class NoSpecialTokens:
        pad_token_id = None

        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def __call__(self, texts, **kwargs):
            return {"input_ids": [ids[1:] for ids in self.tokenizer(texts, **kwargs)["input_ids"]]}  # drop the BOS

    model = from_pretrained(qwen_src, attention="bidirectional")
    embeddings = encode(model, NoSpecialTokens(load_tokenizer(qwen_src)), ["", "dog", ""], max_length=MAX_LENGTH)
    assert np.isfinite(embeddings).all()
    np.testing.assert_array_equal(embeddings[[0, 2]], 0.0)
    assert np.linalg.norm(embeddings[1]) == pytest.approx(1.0, abs=fp32_tol(64))  # a 64-wide fp32 norm


def test_embed_cli_matches_encode(qwen_src, tmp_path, capsys):
    txt = tmp_path / "texts.txt"
    txt.write_text("\n".join(TEXTS) + "\n")
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    model = from_pretrained(qwen_src)  # the attention config.json declares, as the CLI; unrolled, the CLI's scanned
    assert not model.runtime.scan_layers and load_encoder(qwen_src)[0].runtime.scan_layers
    expected = encode(model, load_tokenizer(qwen_src), TEXTS, instruction="find it", max_length=MAX_LENGTH)
    for source in (txt, jsonl):
        out = tmp_path / f"{source.stem}{source.suffix}.npy"
        argv = ["embed", "--model", qwen_src, "--input", source, "--output", out, "--instruction", "find it"]
        assert run_cli([*argv, "--max-length", MAX_LENGTH, "--batch-size", 4]) == 0
        np.testing.assert_allclose(np.load(out), expected, atol=1e-5)  # unit vectors; batches of other shapes
        assert "embedded 7 texts (64 dimensions); 1 truncated" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_embed_cli_bad_inputs(qwen_src, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    out = tmp_path / "out.npy"
    assert run_cli(["embed", "--model", qwen_src, "--input", empty, "--output", out]) == 2
    assert "holds no text" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    assert run_cli(["embed", "--model", qwen_src, "--input", bad, "--output", out]) == 2
    assert "no string 'text' field" in capsys.readouterr().err
    texts = tmp_path / "t.txt"
    texts.write_text("a\n")
    assert run_cli(["embed", "--model", tmp_path, "--input", texts, "--output", out]) == 2
    assert "not a model directory" in capsys.readouterr().err
    assert not out.exists()
