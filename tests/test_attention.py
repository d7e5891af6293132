"""Mask semantics, counted key by key, agreement of every attention implementation, and the dispatch."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models import attention
from bidirlm_jax.models.attention import attend, build_masks
from bidirlm_jax.models.config import FULL, SLIDING
from bidirlm_jax.models.presets import PRESETS

T, W = 32, 8
CONFIG = PRESETS["tiny-gemma3"].replace(sliding_window=W)


def _mask(layer_type=SLIDING, attention_mask=None, segment_ids=None, **mode):
    attention_mask = np.ones((1, T), np.int32) if attention_mask is None else attention_mask
    return np.asarray(build_masks(CONFIG.replace(**mode), jnp.asarray(attention_mask), segment_ids)[layer_type])[0, 0]


@pytest.mark.parametrize(
    "mode, visible",
    [
        ({"attention": "causal"}, lambda d: 0 <= d < W),  # d = i - j; transformers: kv > q - W
        ({"attention": "bidirectional", "bidirectional_window": "half"}, lambda d: abs(d) <= W // 2),
        ({"attention": "bidirectional", "bidirectional_window": "full"}, lambda d: abs(d) <= W),
        ({"attention": "bidirectional", "bidirectional_window": "none"}, lambda d: True),
    ],
)
def test_sliding_windows(mode, visible):
    expected = np.array([[visible(i - j) for j in range(T)] for i in range(T)])
    np.testing.assert_array_equal(_mask(**mode), expected)


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_global_layers_ignore_the_window(attention):
    expected = np.tril(np.ones((T, T), bool)) if attention == "causal" else np.ones((T, T), bool)
    np.testing.assert_array_equal(_mask(FULL, attention=attention), expected)


def test_padding_and_segments():
    attention_mask = np.ones((1, T), np.int32)
    attention_mask[0, :3] = 0
    segments = np.array([[0] * 3 + [1] * 10 + [2] * 19])
    mask = _mask(FULL, attention_mask, jnp.asarray(segments), attention="bidirectional")
    same = segments[0][:, None] == segments[0][None, :]
    real = attention_mask[0].astype(bool)
    np.testing.assert_array_equal(mask[3:], (same & real[None, :])[3:])
    # padding queries see only themselves, so the softmax over their row stays finite
    np.testing.assert_array_equal(mask[:3], np.eye(T, dtype=bool)[:3])


def test_implementations_agree():
    key = jax.random.PRNGKey(0)
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (2, T, 4, 16))
    k = jax.random.normal(kk, (2, T, 2, 16))
    v = jax.random.normal(kv, (2, T, 2, 16))
    attention_mask = np.ones((2, T), np.int32)
    attention_mask[1, -5:] = 0
    mask = build_masks(CONFIG, jnp.asarray(attention_mask), None)[SLIDING]
    ref = attend(q, k, v, mask, scale=0.25, implementation="reference")
    for implementation in ("xla", "blocked", "auto"):
        out = attend(q, k, v, mask, scale=0.25, implementation=implementation)
        np.testing.assert_allclose(out, ref, atol=2e-6)
    assert np.isfinite(np.asarray(ref)).all()


# --- "auto" on a GPU: cuDNN where it compiles, XLA where it refuses in any way, each choice logged once -----


@pytest.fixture
def fake_gpu(monkeypatch):
    """A GPU backend whose cuDNN kernel is XLA's (so it runs here) unless a test makes it refuse."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    calls = []

    def cudnn(q, k, v, mask, *, scale):
        calls.append(q.shape)
        return attention._KERNELS["xla"](q, k, v, mask, scale=scale)

    monkeypatch.setitem(attention._KERNELS, "cudnn", cudnn)
    attention.cudnn_refusal.cache_clear()
    attention._logged.clear()
    yield calls
    attention.cudnn_refusal.cache_clear()
    attention._logged.clear()


def _qkv(dtype=jnp.bfloat16, t=T):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(kq, (2, t, 4, 16), dtype)
    k, v = jax.random.normal(kk, (2, t, 2, 16), dtype), jax.random.normal(kv, (2, t, 2, 16), dtype)
    return q, k, v, build_masks(CONFIG, jnp.ones((2, t), jnp.int32), None)[SLIDING]


def _auto_attend(q, k, v, mask, layer_type="sliding_attention"):
    return jax.jit(lambda *a: attend(*a, scale=0.25, implementation="auto", layer_type=layer_type))(q, k, v, mask)


def test_auto_takes_cudnn_where_it_compiles_and_logs_once(fake_gpu, caplog):
    caplog.set_level(logging.INFO, logger="bidirlm_jax")
    args = _qkv()
    ref = attend(*args, scale=0.25, implementation="reference")
    for _ in range(2):
        np.testing.assert_allclose(np.asarray(_auto_attend(*args), np.float32), np.asarray(ref, np.float32), atol=2e-2)
    _auto_attend(*args, layer_type="full_attention")
    assert attention.cudnn_refusal.cache_info().misses == 1  # probed once for the shape
    assert len(fake_gpu) > 1  # the probe and the calls themselves went to cuDNN
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("cudnn kernel" in line for line in lines), lines
    assert {line.split()[1] for line in lines} == {"sliding_attention", "full_attention"}


@pytest.mark.parametrize(
    "error",
    [
        NotImplementedError("head_dim 256 backward needs Hopper"),
        RuntimeError("cuDNN is not detected."),
        RuntimeError("Require at least Ampere arch to run"),
        ValueError("cuDNN doesn't support this mask"),
        jax.errors.JaxRuntimeError("INTERNAL: cuDNN: no valid execution plan"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_auto_falls_back_to_xla_on_any_cudnn_refusal(fake_gpu, monkeypatch, caplog, error):
    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setitem(attention._KERNELS, "cudnn", refuse)
    caplog.set_level(logging.INFO, logger="bidirlm_jax")
    args = _qkv()
    expected = attend(*args, scale=0.25, implementation="xla")
    for _ in range(2):
        np.testing.assert_array_equal(np.asarray(_auto_attend(*args)), np.asarray(expected))
    assert attention.cudnn_refusal.cache_info().misses == 1
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and record.name.startswith("bidirlm_jax")
    assert "sliding_attention" in record.getMessage() and type(error).__name__ in record.getMessage()
    with pytest.raises(ConfigError, match="attention_impl='cudnn' cannot run here"):
        attend(*args, scale=0.25, implementation="cudnn")


def test_auto_never_tries_cudnn_in_fp32(fake_gpu):
    _auto_attend(*_qkv(jnp.float32))
    assert fake_gpu == [] and attention.cudnn_refusal.cache_info().misses == 0


def test_a_model_logs_one_choice_per_layer_type(fake_gpu, caplog):
    """4 layers of 2 types: two log lines, and the model runs on the cuDNN path."""
    from flax import nnx

    from bidirlm_jax.models.transformer import Transformer

    caplog.set_level(logging.INFO, logger="bidirlm_jax")
    model = Transformer(CONFIG.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
    nnx.jit(lambda m, ids: m(ids).logits)(model, jnp.ones((2, 16), jnp.int32))
    lines = sorted(r.getMessage() for r in caplog.records)
    assert [line.split()[1] for line in lines] == ["full_attention", "sliding_attention"], lines
    assert len(fake_gpu) >= CONFIG.num_layers
