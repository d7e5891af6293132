"""Mask descriptions: the dense mask built from a `MaskSpec` and `Segments` is exactly the one the model
used before masks became descriptions (`_build_masks` below, kept verbatim as the oracle), in every
mode, window, padding and packing case; kernels' segment ids agree with it on every real query."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from bidirlm_jax.kernels.masks import MaskSpec, Segments, dense_mask
from bidirlm_jax.models.config import FULL, SLIDING
from bidirlm_jax.models.masks import layer_specs, mask_spec
from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.models.runtime import Runtime

T, W = 32, 8
CONFIG = get_preset("tiny-gemma3")  # window 8, sliding and global layers


def _build_masks(config, runtime, attention_mask, segment_ids):
    """The `[B, 1, T, T]` masks of `models.attention.build_masks` before this change (the oracle)."""
    t = attention_mask.shape[1]
    i = jnp.arange(t)[:, None]
    j = jnp.arange(t)[None, :]
    valid = attention_mask.astype(bool)
    base = valid[:, None, None, :]
    if segment_ids is not None:
        base = base & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    if runtime.attention == "causal":
        base = base & (j <= i)
    masks = {}
    for layer_type in set(config.layer_types):
        mask = base
        if layer_type == SLIDING:
            w = config.sliding_window
            if runtime.attention == "causal":
                window = i - j < w
            elif runtime.bidirectional_window == "half":
                window = jnp.abs(i - j) <= w // 2
            elif runtime.bidirectional_window == "full":
                window = jnp.abs(i - j) <= w
            else:
                window = jnp.ones_like(i - j, dtype=bool)
            mask = mask & window
        masks[layer_type] = mask | ((i == j) & ~valid[:, None, :, None])
    return masks


def _inputs(padding: str, packed: bool):
    """Three rows: right-padded, left-padded, full (or as `padding` says), optionally packed."""
    mask = np.ones((3, T), np.int32)
    if padding in ("right", "both"):
        mask[0, -7:] = 0
    if padding in ("left", "both"):
        mask[1, :5] = 0
    segments = None
    if packed:
        segments = np.stack([np.repeat([1, 2, 3], [10, 15, 7]), np.repeat([0, 1, 2], [5, 20, 7]), np.full(T, 4)])
        segments = jnp.asarray(segments * mask, jnp.int32)  # padding as segment 0, as data.packing writes it
    return mask, segments


MODES = [
    {"attention": "causal"},
    {"attention": "bidirectional", "bidirectional_window": "half"},
    {"attention": "bidirectional", "bidirectional_window": "full"},
    {"attention": "bidirectional", "bidirectional_window": "none"},
]


@pytest.mark.parametrize("padding, packed", itertools.product(["none", "right", "left", "both"], [False, True]))
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(m.values()))
def test_dense_mask_equals_the_former_masks(mode, padding, packed):
    runtime = Runtime(**mode)
    mask, segments = _inputs(padding, packed)
    expected = _build_masks(CONFIG, runtime, jnp.asarray(mask), segments)
    given_mask = None if padding == "none" else mask
    for layer_type, spec in layer_specs(CONFIG, runtime).items():
        ours = dense_mask(spec, Segments.of(given_mask, segments, mask.shape))
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(expected[layer_type]), err_msg=layer_type)


def test_specs_are_the_documented_bands():
    def spec(layer_type, **mode):
        return mask_spec(CONFIG, Runtime(**mode), layer_type)

    assert spec(FULL, attention="causal") == MaskSpec(None, 0)
    assert spec(SLIDING, attention="causal") == MaskSpec(W - 1, 0)
    assert spec(FULL, attention="bidirectional") == MaskSpec(None, None)
    assert spec(SLIDING, attention="bidirectional", bidirectional_window="half") == MaskSpec(W // 2, W // 2)
    assert spec(SLIDING, attention="bidirectional", bidirectional_window="full") == MaskSpec(W, W)
    assert spec(SLIDING, attention="bidirectional", bidirectional_window="none") == MaskSpec(None, None)
    assert MaskSpec(None, 0).causal and not MaskSpec(None, 0).banded and MaskSpec(3, 3).banded


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(m.values()))
def test_kernel_segment_ids_agree_with_the_dense_mask_on_real_queries(mode):
    """What splash / Triton compute from segment ids and the band: the dense mask on real rows, and
    only the diagonal on padding rows (padding is a segment per token, below every real id)."""
    mask, segments = _inputs("both", packed=True)
    seg = Segments.of(mask, segments, mask.shape)
    ids = np.asarray(seg.kernel_ids())
    valid = mask.astype(bool)
    assert (ids[~valid] < ids[valid].min()).all() and len(set(ids[~valid].tolist())) == (~valid).sum()
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    for spec in layer_specs(CONFIG, Runtime(**mode)).values():
        kernel_mask = (ids[:, :, None] == ids[:, None, :]) & np.asarray(spec.band(i, j))
        dense = np.asarray(dense_mask(spec, seg))[:, 0]
        np.testing.assert_array_equal(kernel_mask[valid], dense[valid])
        np.testing.assert_array_equal(kernel_mask[~valid], np.broadcast_to(np.eye(T, dtype=bool), dense.shape)[~valid])


def test_lengths_and_right_padding():
    mask, _ = _inputs("right", packed=False)
    seg = Segments.of(mask, None, mask.shape)
    assert seg.padded and seg.masked
    np.testing.assert_array_equal(seg.lengths(), [T - 7, T, T])
    assert bool(seg.right_padded())
    mask, _ = _inputs("left", packed=False)
    assert not bool(Segments.of(mask, None, mask.shape).right_padded())
    assert not Segments.of(None, None, (2, T)).masked


# --- the semantics, counted key by key --------------------------------------------------------------


def _mask(layer_type=SLIDING, attention_mask=None, segment_ids=None, **mode):
    spec = mask_spec(CONFIG, Runtime(**mode), layer_type)
    shape = (1, T)
    return np.asarray(dense_mask(spec, Segments.of(attention_mask, segment_ids, shape)))[0, 0]


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
