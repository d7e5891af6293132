"""jax's Pallas Triton flash kernel (the GPU path for segment ids), run here in Pallas' interpret mode,
against the reference: bidirectional and causal, GQA, packed documents and padding, forward and
gradients (fp32, ≤1e-5), alone and under `shard_map`. cuDNN cannot run off a GPU: its dispatch is
tested in `test_attention.py` on a faked platform, its numerics by `benchmarks/gpu_check.py`."""

import contextlib

import jax
import numpy as np
import pytest

from bidirlm_jax.kernels.masks import MaskSpec
from bidirlm_jax.sharding import make_mesh
from tests.attention_cases import outputs_and_grads, padded_segments, qkv

T, D = 128, 64


def _check(spec, kv_heads, segments, mesh=None):
    q, k, v = qkv(t=T, kv_heads=kv_heads, d=D)
    ref, ref_grads = outputs_and_grads("reference", q, k, v, spec, segments)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        out, grads = outputs_and_grads("triton", q, k, v, spec, segments)
    # fp32 on the accelerator: scores over D, softmax sums over T keys and the gradients' sums over T queries,
    # regrouped by the kernel's blocks. 1e-5 is below the worst case fp32_tol(D + 2T) (4e-5 to 7e-5 here),
    # near the √n-typical error of unit-scale values: it runs only on the accelerator, not re-derived there.
    np.testing.assert_allclose(out, ref, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=1e-5)


@pytest.mark.parametrize(
    "spec, kv_heads, segments",
    [(MaskSpec(None, None), 2, "packed"), (MaskSpec(None, 0), 1, "padded")],
    ids=["bidirectional-gqa-packed", "causal-mqa-padded"],
)
def test_triton_equals_the_reference(spec, kv_heads, segments):
    _check(spec, kv_heads, padded_segments(segments, T))


def test_triton_under_shard_map():
    _check(MaskSpec(None, None), 2, padded_segments("packed", T), make_mesh(2, 1, 2, devices=jax.devices()[:4]))
