"""The towers' segment constructors (`Segments.per_item`, `Segments.blocks`): block-diagonal masks as segment
masks, checked against a dense numpy mask through the reference kernel and every CPU kernel `attend` runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.kernels.attention import attend
from bidirlm_jax.kernels.masks import MaskSpec, Segments
from bidirlm_jax.kernels.reference import reference_attention

T, D = 24, 16
BIDIRECTIONAL = MaskSpec(None, None)  # a tower attends within its segments, in both directions
# fp32 against float64: a D-term dot, a T-term softmax sum and a T-term weighted sum of O(1) values,
# logits of |q·k|/√D ≲ 4: 1.19e-7 × (D + 2T) × 4 ≈ 3e-5.
ATOL = 3e-5


def _qkv(b: int):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    shape = (b, T, 4, D)
    return jax.random.normal(kq, shape), jax.random.normal(kk, (b, T, 2, D)), jax.random.normal(kv, (b, T, 2, D))


def _numpy_attention(q, k, v, mask):
    """Softmax attention in float64 over a dense [B, T, T] mask; GQA: query head h reads KV head h // 2."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    k, v = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D)
    logits = np.where(mask[:, None], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", probs, v)


def _check(segments: Segments, mask: np.ndarray, valid: np.ndarray):
    """Every kernel equals the dense numpy mask on real queries (padding queries are never read)."""
    q, k, v = _qkv(mask.shape[0])
    expected = _numpy_attention(q, k, v, mask)
    outputs = {"reference": reference_attention(q, k, v, BIDIRECTIONAL, segments, scale=D**-0.5)}
    for impl in ("auto", "xla", "blocked", "chunked"):
        outputs[impl] = attend(q, k, v, BIDIRECTIONAL, segments, scale=D**-0.5, implementation=impl, block_q=8)
    for impl, out in outputs.items():
        np.testing.assert_allclose(np.asarray(out)[valid], expected[valid], atol=ATOL, err_msg=impl)


def test_per_item_segments_are_the_block_diagonal_mask_of_the_items():
    lengths = np.array([[5, 9, 6], [12, 0, 3], [24, 0, 0]])  # row 0: three images, then 4 padding patches
    segments = Segments.per_item(lengths, T)
    item = np.full((3, T), -1)
    for row, sizes in enumerate(lengths):
        item[row, : sizes.sum()] = np.repeat(np.arange(len(sizes)), sizes)
    valid = item >= 0
    np.testing.assert_array_equal(np.asarray(segments.valid), valid)
    mask = (item[:, :, None] == item[:, None, :]) & valid[:, None, :]
    mask |= np.eye(T, dtype=bool)[None] & ~valid[:, :, None]  # a padding query sees itself
    assert mask[0, 0, :5].all() and not mask[0, 0, 5:].any()  # the first image sees only itself
    _check(segments, mask, valid)


def test_block_segments_are_the_block_diagonal_mask_of_fixed_chunks():
    attention_mask = np.ones((2, T), np.int32)
    attention_mask[1, 19:] = 0  # a shorter clip: its last chunk is partial, then padding
    segments = Segments.blocks((2, T), 8, attention_mask)
    chunk = np.arange(T) // 8
    valid = attention_mask.astype(bool)
    mask = (chunk[:, None] == chunk[None, :])[None] & valid[:, None, :]
    mask |= np.eye(T, dtype=bool)[None] & ~valid[:, :, None]
    assert mask[0, 7, :8].all() and not mask[0, 7, 8:].any()
    _check(segments, mask, valid)
    unpadded = Segments.blocks((2, T), 8)
    assert not unpadded.padded and bool(jnp.all(unpadded.valid))


@pytest.mark.parametrize("make", [lambda: Segments.per_item(np.ones(4), T), lambda: Segments.blocks((1, T), 0)])
def test_segment_constructors_refuse_malformed_arguments(make):
    with pytest.raises(ConfigError):
        make()
