"""Exports to transformers' own classifier classes: logits equal transformers' on the exported directory
(fp32, ≤1e-4 relative) for every class that exists — Gemma3 and Qwen3 sequence classification and
regression, Qwen3 token classification — in both attention modes, on a batch with right and left
padding longer than the sliding window; heads without a class are refused before anything is written;
a fine-tuning run exports with its tokenizer and label map."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from bidirlm_jax.errors import CheckpointError, ConfigError
from bidirlm_jax.io.heads import (
    check_last_token,
    export_classifier,
    export_finetuned,
    hf_class_name,
    load_finetuned,
    read_best,
    save_best,
)
from bidirlm_jax.io.hf import from_pretrained
from bidirlm_jax.io.tokenizer import train_tokenizer
from bidirlm_jax.models.heads import EncoderWithHead, HeadConfig, attach_head
from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.models.runtime import Runtime
from bidirlm_jax.testing import reference
from tests.runs import write_finetune_run

PAD = 0  # reference.batch draws real ids from 3 up, so no real token is the pad token
TASKS = [("classification", 3), ("regression", 1), ("token_classification", 5)]
# The transformers class each (family, task) must load as, spelled out (not asked of the code under test).
HF_CLASSES = {
    ("gemma3", "classification"): "Gemma3TextForSequenceClassification",
    ("gemma3", "regression"): "Gemma3TextForSequenceClassification",
    ("qwen3", "classification"): "Qwen3ForSequenceClassification",
    ("qwen3", "regression"): "Qwen3ForSequenceClassification",
    ("qwen3", "token_classification"): "Qwen3ForTokenClassification",
}


def _padded_batch():
    ids, mask = reference.batch()  # a right-padded, a left-padded and a full row of 24 tokens (window 8)
    return np.where(mask > 0, ids, PAD), mask


def _with_random_head(model: EncoderWithHead, seed: int = 0) -> EncoderWithHead:
    """Head weights of order 1 (init is 0.02), so logits are far from zero and the comparison means something."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model.head, nnx.Param)):
        var[...] = jnp.asarray(rng.normal(size=var.shape), jnp.float32)
    return model


@nnx.jit
def _logits(model, ids, mask):
    return model(ids, mask).logits


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
@pytest.mark.parametrize("family", ["gemma3", "qwen3"])
def test_logits_equal_transformers_classes(family, attention, gemma_dir, qwen_dir, tmp_path):
    encoder = from_pretrained(gemma_dir if family == "gemma3" else qwen_dir, attention=attention)
    ids, mask = _padded_batch()
    for task, n in TASKS:
        head = HeadConfig(task, n, pooling="last")
        if family == "gemma3" and task == "token_classification":
            continue  # no transformers class (refusal tested below)
        model = _with_random_head(attach_head(encoder, head, seed=1))
        labels = [f"c{i}" for i in range(n)] if task != "regression" else None
        out = export_classifier(model, tmp_path / task, labels=labels, pad_token_id=PAD)
        auto = transformers.AutoModelForTokenClassification if task == "token_classification" else (
            transformers.AutoModelForSequenceClassification)  # fmt: skip
        hf, info = auto.from_pretrained(out, attn_implementation="eager", output_loading_info=True)
        assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
        assert type(hf).__name__ == HF_CLASSES[family, task] == hf_class_name(encoder.config, head)
        assert json.loads((out / "config.json").read_text())["architectures"] == [HF_CLASSES[family, task]]
        if attention == "bidirectional":
            flag = hf.config.use_bidirectional_attention if family == "gemma3" else not hf.config.is_causal
            assert flag
        with torch.no_grad():
            theirs = hf.eval()(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
        ours = np.asarray(_logits(model, ids, mask))
        theirs = theirs.reshape(ours.shape)
        if task == "token_classification":
            ours, theirs = ours[mask > 0], theirs[mask > 0]
            assert hf.config.id2label == {i: f"c{i}" for i in range(n)}
        err = np.abs(ours - theirs).max() / np.abs(theirs).max()
        assert err <= 1e-4, (task, err)  # the parity contract with transformers (fp32, eager attention)
        if task == "regression":
            assert hf.config.problem_type == "regression" and hf.config.num_labels == 1


def test_heads_without_a_transformers_class_are_refused(gemma_dir, qwen_dir, tmp_path):
    gemma, qwen = from_pretrained(gemma_dir), from_pretrained(qwen_dir)
    cases = [
        (gemma, HeadConfig("token_classification", 3), "no gemma3 token-classification class"),
        *[
            (qwen, HeadConfig("classification", 3, pooling=p), f"pooling '{p}' has no transformers class")
            for p in ("mean", "first")
        ],  # fmt: skip
        (qwen, HeadConfig("classification", 3, pooling="late"), "eurobert classifier .* has no transformers class"),
        (gemma, HeadConfig("regression", 1, pooling="mean"), "pooling 'mean' has no transformers class"),
    ]
    for encoder, head, message in cases:
        with pytest.raises(ConfigError, match=message):
            export_classifier(attach_head(encoder, head), tmp_path / "out", pad_token_id=PAD)
        assert not (tmp_path / "out").exists()
    model = attach_head(qwen, HeadConfig("classification", 3, pooling="last"))
    assert qwen.config.pad_token_id is None
    with pytest.raises(ConfigError, match="pass pad_token_id"):
        export_classifier(model, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"2 labels \['a', 'b'\] for a head with 3 outputs"):
        export_classifier(model, tmp_path / "out", labels=["a", "b"], pad_token_id=PAD)
    with pytest.raises(ConfigError, match="needs an EncoderWithHead"):
        export_classifier(qwen, tmp_path / "out", pad_token_id=PAD)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["the cat sits on the mat", "a dog runs in the park", "an apple a day"] * 50
    return train_tokenizer(texts, 512)


def test_a_fine_tuning_run_exports_with_its_tokenizer_and_labels(tmp_path, tokenizer):
    config, runtime = get_preset("tiny-gemma3"), Runtime(attention="bidirectional")
    head = HeadConfig("classification", 2, "last")
    latest = _with_random_head(EncoderWithHead(config, head, runtime, rngs=nnx.Rngs(0)), seed=0)
    model = _with_random_head(EncoderWithHead(config, head, runtime, rngs=nnx.Rngs(1)), seed=1)  # the best step's
    run = tmp_path / "run"
    write_finetune_run(run, latest, tokenizer, ["neg", "pos"])
    assert read_best(run) is None and load_finetuned(run)[1]["step"] == 3  # no best yet: the latest step
    save_best(run, nnx.state(model, nnx.Param), step=2, metrics={"accuracy": 0.75})
    assert read_best(run) == {"step": 2, "metrics": {"accuracy": 0.75}}

    for which, expected, step in (("best", model, 2), ("latest", latest, 3), (3, latest, 3)):
        loaded, description = load_finetuned(run, step=which)
        assert description["labels"] == ["neg", "pos"] and description["step"] == step
        assert loaded.head_config == head
        for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(loaded)), nnx.to_flat_state(nnx.state(expected))):
            np.testing.assert_array_equal(a[...], b[...], err_msg=str(p))
    with pytest.raises(CheckpointError, match=r"no committed step 7 \(it has \[3\]\)"):
        load_finetuned(run, step=7)

    out = export_finetuned(run, tmp_path / "hf")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out, attn_implementation="eager").eval()
    assert type(hf).__name__ == "Gemma3TextForSequenceClassification"
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert hf.config.id2label == {0: "neg", 1: "pos"} and hf.config.pad_token_id == hf_tokenizer.pad_token_id
    for side in ("right", "left"):
        hf_tokenizer.padding_side = side
        batch = hf_tokenizer(["the cat sits", "a dog runs in the park today"], padding=True, return_tensors="np")
        with torch.no_grad():
            theirs = hf(**{k: torch.as_tensor(v) for k, v in batch.items()}).logits.numpy()
        ours = np.asarray(_logits(model, batch["input_ids"], batch["attention_mask"]))
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())  # parity contract

    with pytest.raises(CheckpointError, match="already exists"):
        export_finetuned(run, tmp_path / "hf")  # an existing output is never overwritten unasked


def test_run_export_refusals(tmp_path, tokenizer):
    config = get_preset("tiny-gemma3")
    model = EncoderWithHead(config, HeadConfig("classification", 2, "mean"), rngs=nnx.Rngs(0))
    run = tmp_path / "run"
    write_finetune_run(run, model, tokenizer, ["a", "b"])
    with pytest.raises(ConfigError, match="pooling 'mean' has no transformers class"):
        export_finetuned(run, tmp_path / "hf")
    with pytest.raises(ConfigError, match="no head.json"):
        load_finetuned(tmp_path)
    assert not (tmp_path / "hf").exists()

    class EndsWithPad:
        def __call__(self, text):
            return {"input_ids": [2, 7, 0]}

    with pytest.raises(ConfigError, match="ends every text with token 0, which is also its pad token"):
        check_last_token(EndsWithPad(), 0)
