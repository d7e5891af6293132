"""Mask semantics, counted key by key, and agreement of every attention implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
