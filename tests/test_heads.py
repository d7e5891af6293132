"""Task heads: each pooling computed by hand, the late head as the authors' code defines it, dropout only
with an RNG, a head that starts the same from a random init and from a loaded encoder, and settings
refused by name."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models.heads import (
    EncoderWithHead,
    HeadConfig,
    abstract_model_with_head,
    attach_head,
    head_params,
    model_factory,
    with_encoder_params,
)
from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.models.runtime import Runtime
from bidirlm_jax.models.transformer import Transformer

CONFIG, RUNTIME = get_preset("tiny-qwen3"), Runtime(attention="bidirectional")
IDS = np.random.default_rng(0).integers(3, 500, (3, 12)).astype(np.int32)
MASK = np.ones((3, 12), np.int32)
MASK[0, 8:] = 0  # right padding
MASK[1, :4] = 0  # left padding


@nnx.jit
def _run(model, ids, mask, rng=None):
    return model(ids, mask, rng=rng)


def _model(head: HeadConfig, seed: int = 0) -> EncoderWithHead:
    return EncoderWithHead(CONFIG, head, RUNTIME, rngs=nnx.Rngs(seed))


def _arrays(module) -> dict:
    return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def test_pooled_heads_score_the_pooled_token_by_hand():
    for pooling in ("mean", "first", "last"):
        model = _model(HeadConfig("classification", 3, pooling=pooling))
        out = _run(model, IDS, MASK)
        hidden = np.asarray(out.hidden_states, np.float64)
        w = np.asarray(model.head.score[...], np.float64)
        rows = []
        for b in range(3):
            real = np.flatnonzero(MASK[b])
            pooled = {"mean": hidden[b, real].mean(0), "first": hidden[b, real[0]], "last": hidden[b, real[-1]]}
            rows.append(pooled[pooling] @ w.T)
        np.testing.assert_allclose(out.logits, np.stack(rows), rtol=1e-5, atol=1e-6)  # fp32 vs float64: 64-wide
        assert out.logits.dtype == jnp.float32 and out.logits.shape == (3, 3)
        assert set(_arrays(model.head)) == {"score"}  # no bias: as transformers' `score`


def test_late_head_is_dense_gelu_classifier_then_masked_mean():
    model = _model(HeadConfig("classification", 4, pooling="late"))
    params = {k: np.asarray(v, np.float64) for k, v in _arrays(model.head).items()}
    for k in ("dense_bias", "classifier_bias"):  # non-zero biases, so they are exercised
        getattr(model.head, k)[...] = jnp.asarray(np.random.default_rng(1).normal(size=params[k].shape), jnp.float32)
        params[k] = np.asarray(getattr(model.head, k)[...], np.float64)
    out = _run(model, IDS, MASK)
    hidden = np.asarray(out.hidden_states, np.float64)
    h = hidden @ params["dense"].T + params["dense_bias"]
    h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))  # exact GELU, from its definition
    per_token = h @ params["classifier"].T + params["classifier_bias"]  # [B, T, 4]
    expected = np.stack([per_token[b, MASK[b] > 0].mean(0) for b in range(3)])
    np.testing.assert_allclose(out.logits, expected, rtol=1e-5, atol=1e-6)  # fp32 vs float64: two 64-wide matmuls


def test_token_and_regression_heads():
    model = _model(HeadConfig("token_classification", 5, dropout=0.3))
    out = _run(model, IDS, MASK)
    w, b = (np.asarray(model.head.score[...]), np.asarray(model.head.score_bias[...]))
    np.testing.assert_allclose(out.logits, np.asarray(out.hidden_states) @ w.T + b, rtol=1e-5, atol=1e-6)  # 64-wide
    assert out.logits.shape == (3, 12, 5) and model.head_config.pooling == "none"
    regression = _model(HeadConfig("regression", 1, pooling="last"))
    assert _run(regression, IDS, MASK).logits.shape == (3,)


def test_dropout_only_with_an_rng():
    model = _model(HeadConfig("classification", 3, pooling="mean", dropout=0.5))
    a, b = _run(model, IDS, MASK).logits, _run(model, IDS, MASK).logits
    np.testing.assert_array_equal(a, b)  # evaluation: deterministic
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    d1, d1_again, d2 = (_run(model, IDS, MASK, k).logits for k in (k1, k1, k2))
    np.testing.assert_array_equal(d1, d1_again)
    assert not np.allclose(d1, a) and not np.allclose(d1, d2)
    # the state holds parameters only (no RNG counters), as the train state expects
    _, state = nnx.split(model)
    assert {type(v).__name__ for _, v in nnx.to_flat_state(state)} == {"Param"}


def test_head_starts_the_same_from_random_init_and_from_a_loaded_encoder():
    head = HeadConfig("classification", 3, pooling="late")
    model = model_factory(CONFIG, head, RUNTIME)(nnx.Rngs(7))
    fresh = head_params(CONFIG, head, seed=7)
    expected = {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(fresh)}
    assert expected.keys() == _arrays(model.head).keys()
    for k, v in _arrays(model.head).items():
        np.testing.assert_array_equal(v, expected[k])

    encoder = Transformer(CONFIG, RUNTIME, rngs=nnx.Rngs(3))
    params = with_encoder_params(nnx.state(encoder, nnx.Param), CONFIG, head, seed=7)
    merged = nnx.merge(abstract_model_with_head(CONFIG, head, RUNTIME)[0], params)
    attached = attach_head(encoder, head, seed=7)
    for m in (merged, attached):
        for k, v in _arrays(m.encoder).items():
            np.testing.assert_array_equal(v, _arrays(encoder)[k])
        for k, v in _arrays(m.head).items():
            np.testing.assert_array_equal(v, expected[k])
    np.testing.assert_array_equal(_run(merged, IDS, MASK).logits, _run(attached, IDS, MASK).logits)


def test_head_logical_axes_shard_like_the_encoder():
    model = _model(HeadConfig("classification", 3, pooling="late"))
    axes = {
        "/".join(map(str, p)): v.get_metadata()["out_sharding"] for p, v in nnx.to_flat_state(nnx.state(model.head))
    }
    assert axes == {"dense": (None, "embed"), "dense_bias": (None,), "classifier": (None, "embed"),
                    "classifier_bias": (None,)}  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(task="ner", num_labels=3), "not one of"),
        (dict(task="regression", num_labels=2), "one output"),
        (dict(task="classification", num_labels=1), "at least 2 labels"),
        (dict(task="classification", num_labels=3, pooling="max"), "pooling 'max'"),
        (dict(task="classification", num_labels=3, dropout=1.0), r"dropout 1.0 must lie in \[0, 1\)"),
    ],
)
def test_bad_head_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        HeadConfig(**kwargs)


def test_head_config_json_round_trip():
    head = HeadConfig("classification", 3, pooling="late", dropout=0.1)
    assert HeadConfig.from_json(head.to_json()) == head
    with pytest.raises(ConfigError, match="malformed head description"):
        HeadConfig.from_json({"num_labels": 3})


def _gelu_erf(x: np.ndarray) -> np.ndarray:
    """Exact GELU, x·Φ(x), from the error function (torch's `nn.GELU()`, not jax's)."""
    from scipy.special import erf

    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


@pytest.mark.parametrize("pooling", ["mean", "first", "late"])
def test_eurobert_head_is_the_authors_classifier(pooling):
    """The authors' released head, rebuilt in numpy from their code (EuroBERT's / BidirLM's
    `…ForSequenceClassification`): pool (`bos` = first, mean over the mask) → dense + bias → exact GELU →
    classifier + bias; `late`: the same on every token, then the masked mean of the logits."""
    model = _model(HeadConfig("classification", 4, pooling=pooling, classifier="eurobert"))
    assert model.head_config.classifier == "eurobert"
    rng = np.random.default_rng(2)
    for k in ("dense_bias", "classifier_bias"):  # non-zero biases, so they are exercised
        getattr(model.head, k)[...] = jnp.asarray(rng.normal(size=getattr(model.head, k)[...].shape), jnp.float32)
    p = {k: np.asarray(v, np.float64) for k, v in _arrays(model.head).items()}
    assert set(p) == {"dense", "dense_bias", "classifier", "classifier_bias"}
    out = _run(model, IDS, MASK)
    hidden = np.asarray(out.hidden_states, np.float64)
    rows = []
    for b in range(3):
        real = hidden[b, MASK[b] > 0]
        x = {"mean": real.mean(0), "first": real[0], "late": real}[pooling]
        logits = _gelu_erf(x @ p["dense"].T + p["dense_bias"]) @ p["classifier"].T + p["classifier_bias"]
        rows.append(logits.mean(0) if pooling == "late" else logits)
    # fp32 head: two matmuls over d (≤ 64 terms) of O(1) values, each term rounding ≤ 2⁻²⁴ relative
    np.testing.assert_allclose(out.logits, np.stack(rows), rtol=1e-5, atol=1e-5)


def test_eurobert_head_with_regression_and_dropout():
    model = _model(HeadConfig("regression", 1, pooling="mean", dropout=0.5, classifier="eurobert"))
    a = _run(model, IDS, MASK).logits
    assert a.shape == (3,)
    np.testing.assert_array_equal(a, _run(model, IDS, MASK).logits)  # evaluation: no dropout
    assert not np.allclose(a, _run(model, IDS, MASK, jax.random.PRNGKey(0)).logits)  # training: dropout


def test_classifier_defaults_and_refusals():
    assert HeadConfig("classification", 3, pooling="mean").classifier == "linear"
    assert HeadConfig("classification", 3, pooling="late").classifier == "eurobert"
    assert HeadConfig("token_classification", 3, classifier="eurobert").classifier == "none"
    with pytest.raises(ConfigError, match="classifier 'mlp' is not one of"):
        HeadConfig("classification", 3, classifier="mlp")
    with pytest.raises(ConfigError, match="finetune.classifier=eurobert"):
        HeadConfig("classification", 3, pooling="late", classifier="linear")
    head = HeadConfig("classification", 3, pooling="first", classifier="eurobert")
    assert HeadConfig.from_json(head.to_json()) == head
    # a head.json written before the option existed reads back as the head it trained
    assert HeadConfig.from_json({"task": "classification", "num_labels": 3, "pooling": "late"}).classifier == "eurobert"
    assert HeadConfig.from_json({"task": "classification", "num_labels": 3, "pooling": "mean"}).classifier == "linear"
