"""TPU splash attention, run here in Pallas' interpret mode, against the reference: every mask kind,
GQA and MQA, packed documents and padding, forward and gradients (fp32, ≤1e-5), alone and under
`shard_map` on a mesh of fake devices. Smallest shapes that still span several 128-blocks."""

import jax
import numpy as np
import pytest

from bidirlm_jax.kernels.masks import MaskSpec
from bidirlm_jax.sharding import make_mesh
from tests.attention_cases import outputs_and_grads, padded_segments, qkv

T, W, D = 256, 32, 64
BLOCKS = {"block_q": 128, "block_kv": 128}

CASES = {
    "full-gqa-packed": (MaskSpec(None, None), 2, "packed"),
    "causal-gqa-padded": (MaskSpec(None, 0), 2, "padded"),
    "half-mqa-packed": (MaskSpec(W // 2, W // 2), 1, "packed"),
    "full-window-gqa": (MaskSpec(W, W), 2, "none"),
    "causal-sliding-mqa-padded": (MaskSpec(W - 1, 0), 1, "padded"),
}


def _check(spec, kv_heads, segments, mesh=None):
    q, k, v = qkv(t=T, kv_heads=kv_heads, d=D)
    ref, ref_grads = outputs_and_grads("reference", q, k, v, spec, segments)
    if mesh is None:
        out, grads = outputs_and_grads("splash", q, k, v, spec, segments, **BLOCKS)
    else:
        with jax.set_mesh(mesh):
            out, grads = outputs_and_grads("splash", q, k, v, spec, segments, **BLOCKS)
    # fp32 on the accelerator: scores over D, softmax sums over T keys and the gradients' sums over T queries,
    # regrouped by the kernel's blocks. 1e-5 is below the worst case fp32_tol(D + 2T) (4e-5 to 7e-5 here),
    # near the √n-typical error of unit-scale values: it runs only on the accelerator, not re-derived there.
    np.testing.assert_allclose(out, ref, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=1e-5)


@pytest.mark.parametrize("spec, kv_heads, segments", CASES.values(), ids=CASES.keys())
def test_splash_equals_the_reference(spec, kv_heads, segments):
    _check(spec, kv_heads, padded_segments(segments, T))


@pytest.mark.parametrize(
    "mesh_shape, kv_heads",
    [((2, 1, 2), 2), ((2, 1, 2), 1), ((1, 1, 4), 2)],
    ids=["gqa-kv-split", "mqa-kv-replicated", "gqa-kv-repeated"],
)
def test_splash_under_shard_map(mesh_shape, kv_heads):
    """Rows over `data`, query heads over `tensor`; KV heads split with them, replicated (one KV head), or
    repeated per query head (2 KV heads over 4 devices)."""
    mesh = make_mesh(*mesh_shape, devices=jax.devices()[:4])
    _check(MaskSpec(W // 2, W // 2), kv_heads, padded_segments("packed", T), mesh)
