"""The released BidirLM classifiers (`io.released_heads`): tiny ones written in their layout load into our heads
and give the released computation's logits (dense → exact GELU → classifier pooled bos | mean | late, or the token
classifier) on the bidirectional native model's hidden states, left and right padding included; a fine-tuned head
is written back in their layout bit-exact, and a head their classes lack is refused before anything is written."""

import numpy as np
import pytest
import torch
from flax import nnx

from bidirlm_jax.errors import CheckpointError, ConfigError
from bidirlm_jax.io.hf import from_pretrained
from bidirlm_jax.io.hf_config import read_config_dict
from bidirlm_jax.io.released_heads import export_released_classifier, load_released_classifier
from bidirlm_jax.io.tokenizer import train_tokenizer
from bidirlm_jax.models.heads import EncoderWithHead, HeadConfig, attach_head
from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.models.runtime import Runtime
from bidirlm_jax.testing import reference
from tests.encoders import run_cli
from tests.hf_files import assert_bit_exact, tensors
from tests.released_files import write_released
from tests.runs import write_finetune_run

FAMILIES = ("gemma3", "qwen3")


@pytest.fixture(scope="module")
def native(gemma_dir, qwen_dir):
    return {"gemma3": gemma_dir, "qwen3": qwen_dir}


@pytest.fixture(scope="module")
def hidden(native):
    """The native models' bidirectional hidden states on the reference batch (right, left and no padding)."""
    ids, mask = reference.batch()
    return {
        f: np.asarray(
            from_pretrained(p, attention="bidirectional", bidirectional_window="half")(ids, mask).hidden_states
        )
        for f, p in native.items()
    }


def released_logits(hidden: np.ndarray, mask: np.ndarray, t: dict, pooling: str | None) -> np.ndarray:
    """The released classes' forward on their last hidden state, in torch (their rows are unpadded, so `bos`
    is each row's first real token)."""
    h, m = torch.tensor(np.array(hidden)), torch.tensor(mask, dtype=torch.float32)[..., None]
    linear = lambda x, name: x @ torch.as_tensor(t[f"{name}.weight"]).T + torch.as_tensor(t[f"{name}.bias"])
    if pooling is None:  # token classification
        return linear(h, "classifier").numpy()
    if pooling == "late":
        per_token = linear(torch.nn.GELU()(linear(h, "dense")), "classifier")
        return ((per_token * m).sum(1) / m.sum(1)).numpy()
    pooled = h[torch.arange(len(h)), torch.as_tensor(mask.argmax(1))] if pooling == "bos" else (h * m).sum(1) / m.sum(1)
    return linear(torch.nn.GELU()(linear(pooled, "dense")), "classifier").numpy()


CASES = [
    ("sequence", "clf_pooling", "bos", 3),
    ("sequence", "clf_pooling", "mean", 3),
    ("sequence", "clf_pooling", "late", 3),
    ("sequence", "classifier_pooling", "mean", 1),  # the Gemma code's spelling; one label: regression
    ("token", "clf_pooling", "late", 4),
]


@pytest.mark.parametrize("layout, key, pooling, labels", CASES)
@pytest.mark.parametrize("family", FAMILIES)
def test_released_classifiers_load_into_our_heads(native, hidden, tmp_path, family, layout, key, pooling, labels):
    src = write_released(native[family], tmp_path / "src", layout, pooling_key=key, pooling=pooling, num_labels=labels)
    model, names = load_released_classifier(src)
    ids, mask = reference.batch()
    out = model(ids, mask)
    np.testing.assert_array_equal(np.asarray(out.hidden_states), hidden[family])
    expected = released_logits(hidden[family], mask, tensors(src), pooling if layout == "sequence" else None)
    if labels == 1:
        assert model.head_config.task == "regression" and names == []
        expected = expected[..., 0]
    else:
        assert names == [f"L{i}" for i in range(labels)]
    valid = mask.astype(bool) if layout == "token" else np.ones(len(mask), bool)
    np.testing.assert_allclose(np.asarray(out.logits)[valid], expected[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout, pooling", [("sequence", "bos"), ("token", "late")])
def test_export_in_the_released_layout_is_bit_exact(native, tmp_path, layout, pooling):
    src = write_released(native["qwen3"], tmp_path / "src", layout, pooling=pooling)
    model, names = load_released_classifier(src)
    out = export_released_classifier(model, tmp_path / "out", labels=names)
    assert_bit_exact(src, out)
    d = read_config_dict(out)
    assert d["model_type"] == "bidirlm" and d["id2label"] == {str(i): f"L{i}" for i in range(3)}
    if layout == "sequence":
        assert d["architectures"] == ["BidirLMForSequenceClassification"] and d["clf_pooling"] == "bos"
    else:
        assert d["architectures"] == ["BidirLMForTokenClassification"]
    again, _ = load_released_classifier(out)
    assert again.head_config == model.head_config


def test_heads_the_released_classes_lack_are_refused(native, tmp_path):
    encoder = from_pretrained(native["qwen3"], attention="bidirectional")
    for head, message in (
        (HeadConfig("classification", 2, pooling="last"), "a linear probe has no released class"),
        (HeadConfig("classification", 2, pooling="last", classifier="eurobert"), "not 'last'"),
    ):
        with pytest.raises(ConfigError, match=message):
            export_released_classifier(attach_head(encoder, head), tmp_path / "out")
        assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="holds no released classifier"):
        load_released_classifier(write_released(native["qwen3"], tmp_path / "mlm", "masked_lm"))
    with pytest.raises(ConfigError, match="not a released BidirLM checkpoint"):
        load_released_classifier(native["qwen3"])


@pytest.mark.parametrize("head", [HeadConfig("classification", 2, pooling="late"), HeadConfig("classification", 2)])
def test_a_fine_tuning_run_exports_as_a_released_classifier(tmp_path, capsys, head):
    """`bidirlm export RUN OUT --format bidirlm`: the eurobert head in the released layout with the run's labels
    and tokenizer, read back to the same logits; a linear probe exits 2 and writes nothing."""
    model = EncoderWithHead(get_preset("tiny-gemma3"), head, Runtime(attention="bidirectional"), rngs=nnx.Rngs(3))
    tokenizer = train_tokenizer(["the cat sits on the mat", "a dog runs in the park"] * 50, 512)
    write_finetune_run(tmp_path / "run", model, tokenizer, ["neg", "pos"])
    code = run_cli(["export", tmp_path / "run", tmp_path / "out", "--format", "bidirlm"])
    if head.classifier == "linear":
        assert code == 2 and "a linear probe has no released class" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()
        return
    assert code == 0
    loaded, names = load_released_classifier(tmp_path / "out")
    assert names == ["neg", "pos"] and (tmp_path / "out" / "tokenizer.json").is_file()
    assert loaded.head_config == head
    ids, mask = reference.batch(length=40)
    np.testing.assert_allclose(np.asarray(loaded(ids, mask).logits), np.asarray(model(ids, mask).logits), atol=1e-6)
