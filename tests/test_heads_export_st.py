"""The authors' classifier (`eurobert`: dense → GELU → classifier) exported as a sentence-transformers model:
`SentenceTransformer(dir)` (torch, its stock modules) gives our logits for every pooling, Gemma3 and Qwen3,
right and left padding, texts longer than the sliding window; a fine-tuning run exports its best step, label
map and head; transformers' own classes refuse it by name."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.companions import companion_files
from bidirlm_jax.io.heads import export_classifier, export_finetuned, hf_class_name, save_best
from bidirlm_jax.io.st_heads import export_st_classifier
from bidirlm_jax.io.tokenizer import train_tokenizer
from bidirlm_jax.models.heads import EncoderWithHead, HeadConfig
from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.models.runtime import Runtime
from tests.runs import write_finetune_run

sentence_transformers = pytest.importorskip("sentence_transformers")
torch = pytest.importorskip("torch")

TEXTS = ["the cat sits on the mat", "a dog runs in the park and the cat sits on the mat all day long", "an apple"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(["the cat sits on the mat", "a dog runs in the park", "an apple a day"] * 50, 512, out)
    return out


def _model(family: str, head: HeadConfig, seed: int = 0) -> EncoderWithHead:
    """Random encoder, head weights and biases of order 1 / √d (init is 0.02), so every term counts."""
    model = EncoderWithHead(get_preset(f"tiny-{family}"), head, Runtime(attention="bidirectional"), rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model.head, nnx.Param)):
        var[...] = jnp.asarray(rng.normal(size=var.shape) / np.sqrt(var.shape[-1]), jnp.float32)
    return model


def _compare(model: EncoderWithHead, out, side: str) -> None:
    st = sentence_transformers.SentenceTransformer(str(out), device="cpu")
    st.tokenizer.padding_side = side
    features = st.tokenize(TEXTS)
    assert features["attention_mask"].min() == 0  # some row is padded
    assert features["input_ids"].shape[1] > model.config.sliding_window if model.config.family == "gemma3" else True
    with torch.no_grad():
        theirs = st(dict(features))["sentence_embedding"].numpy()
    ours = np.asarray(model(features["input_ids"].numpy(), features["attention_mask"].numpy()).logits)
    theirs = theirs.reshape(ours.shape)
    # fp32 both sides: the encoder's (2 layers, d=64) and the head's reductions in another order, relative
    # error a few hundred ULPs of the largest logit at most
    scale = np.abs(theirs).max()
    assert scale > 0.1  # the logits are not all near zero, so the check can fail
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * scale, err_msg=f"{side} padding")


@pytest.mark.parametrize("family", ["gemma3", "qwen3"])
@pytest.mark.parametrize("pooling", ["mean", "first", "late"])
def test_sentence_transformers_gives_our_logits(family, pooling, tokenizer_dir, tmp_path):
    head = HeadConfig("classification", 3, pooling=pooling, classifier="eurobert")
    model = _model(family, head)
    out = export_st_classifier(
        model, tmp_path / "st", labels=["a", "b", "c"], max_length=64, extra_files=companion_files(tokenizer_dir)
    )
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((out / "modules.json").read_text())]
    expected = ["Transformer", "Dense", "Dense", "Pooling"] if pooling == "late" else [
        "Transformer", "Pooling", "Dense", "Dense"]  # fmt: skip
    assert modules == expected
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "a", "1": "b", "2": "c"} and config["label2id"] == {"a": 0, "b": 1, "c": 2}
    assert HeadConfig.from_json(json.loads((out / "head.json").read_text())["head"]) == head
    for side in ("right", "left"):
        _compare(model, out, side)


def test_regression_and_refusals(tokenizer_dir, tmp_path):
    model = _model("qwen3", HeadConfig("regression", 1, pooling="mean", classifier="eurobert"))
    out = export_st_classifier(model, tmp_path / "st", extra_files=companion_files(tokenizer_dir))
    _compare(model, out, "right")
    with pytest.raises(ConfigError, match="eurobert classifier .* has no transformers class"):
        hf_class_name(model.config, model.head_config)
    with pytest.raises(ConfigError, match="eurobert classifier .* has no transformers class"):
        export_classifier(model, tmp_path / "hf", pad_token_id=0)
    linear = _model("qwen3", HeadConfig("classification", 2, pooling="mean"))
    with pytest.raises(ConfigError, match="exports the eurobert classifier"):
        export_st_classifier(linear, tmp_path / "x")
    with pytest.raises(ConfigError, match="do not name the head's 3 outputs"):
        export_st_classifier(_model("qwen3", HeadConfig("classification", 3, classifier="eurobert")),
                             tmp_path / "x", labels=["a", "a", "b"])  # fmt: skip
    assert not (tmp_path / "hf").exists() and not (tmp_path / "x").exists()


def test_a_fine_tuning_run_exports_its_best_step(tokenizer_dir, tmp_path):
    from bidirlm_jax.io.tokenizer import load_tokenizer

    head = HeadConfig("classification", 2, pooling="late", classifier="eurobert")
    latest, best = _model("gemma3", head, seed=0), _model("gemma3", head, seed=1)
    run = tmp_path / "run"
    write_finetune_run(run, latest, load_tokenizer(tokenizer_dir), ["neg", "pos"])
    save_best(run, nnx.state(best, nnx.Param), step=2, metrics={"accuracy": 0.5})
    out = export_finetuned(run, tmp_path / "st")
    recorded = json.loads((out / "head.json").read_text())
    assert recorded["labels"] == ["neg", "pos"] and HeadConfig.from_json(recorded["head"]) == head
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 32  # the run's
    _compare(best, out, "right")  # the best step's weights...
    with pytest.raises(AssertionError):
        _compare(latest, out, "right")  # ...not the latest's
