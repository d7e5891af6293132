"""MNTP held-out evaluation: equals a direct computation from the model's logits, independent of batching."""

import json

import numpy as np
import pytest

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.evals.lm import evaluate_domains, evaluate_mntp
from bidirlm_jax.io.hf import from_pretrained
from bidirlm_jax.io.tokenizer import load_tokenizer
from bidirlm_jax.testing import reference
from bidirlm_jax.testing.tolerance import fp32_tol
from tests.encoders import MAX_LENGTH, TEXTS, make_encoder_src, run_cli


@pytest.fixture(scope="module")
def src(qwen_dir, tmp_path_factory):
    return make_encoder_src(qwen_dir, tmp_path_factory.mktemp("lm-eval") / "src")


def _reference(model, tokenizer, texts, ratio, seed):
    """Each text alone: mask as documented, run the model, score token j+1 from the logits at j."""
    mask_id, specials = tokenizer.mask_token_id, set(tokenizer.all_special_ids)
    losses, hits = [], []
    for i, text in enumerate(texts):
        ids = np.array(tokenizer(text, truncation=True, max_length=MAX_LENGTH)["input_ids"])
        maskable = ~np.isin(ids, list(specials))
        maskable[0] = False
        masked = maskable & (np.random.default_rng([seed, i]).random(ids.size) < ratio)
        padded = np.zeros((1, MAX_LENGTH), np.int32)  # one shape, one compilation; right padding changes nothing
        padded[0, : ids.size] = np.where(masked, mask_id, ids)
        logits = np.asarray(reference.logits(model, padded, (np.arange(MAX_LENGTH) < ids.size)[None]))
        logits = logits[0, : ids.size].astype(np.float64)
        top = logits.max(-1, keepdims=True)
        log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        for j in np.flatnonzero(masked):
            losses.append(-log_probs[j - 1, ids[j]])
            hits.append(logits[j - 1].argmax() == ids[j])
    return float(np.mean(hits)), float(np.mean(losses)), len(losses)


def test_matches_direct_computation_and_ignores_batching(src):
    model = from_pretrained(src, attention="bidirectional")
    tokenizer = load_tokenizer(src)
    accuracy, loss, count = _reference(model, tokenizer, TEXTS, 0.3, seed=3)
    for batch_size in (2, 8):
        result = evaluate_mntp(
            model, tokenizer, TEXTS, mask_ratio=0.3, max_length=MAX_LENGTH, batch_size=batch_size, seed=3
        )
        assert result["masked_tokens"] == count and result["num_texts"] == len(TEXTS)
        assert result["masked_accuracy"] == pytest.approx(accuracy, abs=1e-9)  # a ratio of counts (float64)
        assert result["loss"] == pytest.approx(loss, rel=fp32_tol(model.config.vocab_size))  # log-softmax over V
    with pytest.raises(ConfigError, match="mask_ratio"):
        evaluate_mntp(model, tokenizer, TEXTS, mask_ratio=1.5)


def test_truncated_texts_are_counted_and_logged(src, caplog):
    """Held-out texts longer than `max_length` are cut: the result, each domain's scores and the log say how many."""
    model = from_pretrained(src, attention="bidirectional")
    tokenizer = load_tokenizer(src)
    lengths = [len(ids) for ids in tokenizer(TEXTS)["input_ids"]]
    max_length = sorted(lengths)[len(lengths) // 2]
    expected = sum(n > max_length for n in lengths)
    assert 0 < expected < len(TEXTS)
    with caplog.at_level("WARNING", logger="bidirlm_jax.evals.lm"):
        result = evaluate_mntp(model, tokenizer, TEXTS, max_length=max_length, batch_size=8)
    assert result["num_truncated"] == expected
    assert f"{expected} of {len(TEXTS)} texts were longer than {max_length} tokens" in caplog.text
    scores = evaluate_domains(model, tokenizer, {"all": TEXTS, "short": TEXTS[:1]}, max_length=256, batch_size=8)
    assert scores["truncated_texts/all"] == scores["truncated_texts/short"] == 0
    scores = evaluate_domains(model, tokenizer, {"all": TEXTS}, max_length=max_length, batch_size=8)
    assert scores["truncated_texts/all"] == expected


def test_eval_cli_mntp(src, tmp_path, capsys):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n".join(TEXTS))
    out = tmp_path / "results.json"
    argv = ["eval", "--model", src, "--mntp-text", held_out, "--attention", "bidirectional", "--output", out]
    assert run_cli([*argv, "--max-length", MAX_LENGTH, "--batch-size", 8]) == 0
    assert "masked accuracy" in capsys.readouterr().out
    saved = json.loads(out.read_text())["mntp"][str(held_out)]
    model = from_pretrained(src, attention="bidirectional")
    expected = evaluate_mntp(model, load_tokenizer(src), TEXTS, max_length=MAX_LENGTH, batch_size=8)
    assert saved == pytest.approx(expected)
