"""Every XLA attention kernel against the reference (forward and gradients), and the dispatch: the table of
`kernels.attention.choose` on faked platforms, cuDNN's probe, fallbacks and logging."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.kernels import attention
from bidirlm_jax.kernels.attention import Case, attend, choose
from bidirlm_jax.kernels.masks import MaskSpec, Segments
from bidirlm_jax.models.masks import layer_specs
from bidirlm_jax.models.presets import PRESETS
from bidirlm_jax.models.runtime import Runtime
from bidirlm_jax.testing.tolerance import fp32_tol
from tests.attention_cases import outputs_and_grads, qkv

T, W = 32, 8
CONFIG = PRESETS["tiny-gemma3"].replace(sliding_window=W)  # causal; 2 sliding + 2 global layers
SPECS = {
    "bidirectional": MaskSpec(None, None),
    "causal": MaskSpec(None, 0),
    "half": MaskSpec(W // 2, W // 2),
    "full": MaskSpec(W, W),
    "causal-sliding": MaskSpec(W - 1, 0),
}


def packed_segments(b=2, t=T) -> Segments:
    """Row 0: two documents then right padding; row 1: left padding then one document."""
    mask = np.ones((b, t), np.int32)
    mask[0, -5:] = 0
    mask[1, :6] = 0
    ids = np.zeros((b, t), np.int32)
    ids[0, :12], ids[0, 12:-5] = 1, 2
    ids[1, 6:] = 1
    return Segments.of(mask, ids, (b, t))


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_xla_kernels_equal_the_reference(spec):
    """Packed documents with padding on both sides; `chunked` in blocks of 12 (three, the last one padded)."""
    q, k, v = qkv()
    segments = packed_segments()
    ref, ref_grads = outputs_and_grads("reference", q, k, v, spec, segments)
    assert np.isfinite(ref).all()
    for impl, blocks in [("xla", {}), ("blocked", {}), ("chunked", {"block_q": 12})]:
        out, grads = outputs_and_grads(impl, q, k, v, spec, segments, **blocks)
        # Outputs are softmax-weighted means of unit-normal values over <= T = 32 keys: fp32_tol(16 + T) ≈ 6e-6
        # bounds the 16-wide scores and the key sums; the gradients sum again over the 32 queries.
        np.testing.assert_allclose(out, ref, atol=fp32_tol(16 + T), err_msg=impl)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(g, r, atol=fp32_tol(16 + 2 * T, 2), err_msg=impl)


# --- the decision table (compiles faked: only the logic is tested here) ---------------------------------


def _case(spec="bidirectional", dtype="bfloat16", t=1024, kv_heads=2, ids=False, padded=False, block=512):
    return Case((1, t, 4, 128), (1, t, kv_heads, 128), dtype, SPECS[spec], ids, padded, block, block)


@pytest.mark.parametrize(
    "platform, case, single, kernel, fallback",
    [
        ("tpu", _case(), True, "splash", None),
        ("tpu", _case("half", ids=True, padded=True, kv_heads=1), False, "splash", None),
        ("tpu", _case(t=1000), True, "chunked", None),  # 1000 is not a multiple of the 512-blocks
        ("tpu", _case(t=64), True, "chunked", None),  # shorter than one 128-lane block
        ("gpu", _case("causal"), True, "cudnn", None),
        ("gpu", _case("causal-sliding"), True, "cudnn", None),
        ("gpu", _case("bidirectional"), True, "cudnn", None),
        ("gpu", _case("causal", padded=True), True, "cudnn", "triton"),
        ("gpu", _case("causal-sliding", padded=True), True, "cudnn", "chunked"),
        ("gpu", _case("causal", ids=True), True, "triton", None),
        ("gpu", _case("bidirectional", ids=True, padded=True), False, "triton", None),
        ("gpu", _case("bidirectional", dtype="float32"), True, "triton", None),
        ("gpu", _case("half"), True, "chunked", None),
        ("gpu", _case("full", ids=True), True, "chunked", None),
        ("gpu", _case("causal-sliding", ids=True), True, "chunked", None),
        ("gpu", _case("bidirectional", t=1000, ids=True), True, "chunked", None),
        ("cpu", _case(dtype="float32"), True, "blocked", None),
        ("cpu", _case(t=8192), True, "chunked", None),
        ("cpu", _case(), False, "chunked", None),
    ],
)
def test_choose(monkeypatch, platform, case, single, kernel, fallback):
    monkeypatch.setattr(attention, "compile_refusal", lambda *a: None)
    choice = choose(platform, case, single_device=single)
    assert (choice.kernel, choice.fallback) == (kernel, fallback), choice.refused


def test_choose_takes_the_next_kernel_when_one_does_not_compile(monkeypatch):
    monkeypatch.setattr(attention, "compile_refusal", lambda kernel, case: "no" if kernel != "chunked" else None)
    choice = choose("gpu", _case("causal"))
    assert choice.kernel == "chunked" and [k for k, _ in choice.refused] == ["cudnn", "triton"]
    assert choose("tpu", _case()).refused == (("splash", "no"),)


# --- "auto" on a (faked) GPU: cuDNN where it compiles, the next kernel where it refuses, each choice logged once ---


@pytest.fixture
def fake_gpu(monkeypatch):
    """A GPU whose cuDNN and Triton kernels are XLA's (so they run here) unless a test makes them refuse."""
    monkeypatch.setattr(attention, "platform", lambda: "gpu")
    calls = []

    def cudnn(q, k, v, spec, segments, options):
        calls.append(q.shape)
        return attention.KERNELS["xla"](q, k, v, spec, segments, options)

    monkeypatch.setitem(attention.KERNELS, "cudnn", cudnn)
    monkeypatch.setitem(attention.KERNELS, "triton", attention.KERNELS["xla"])
    attention.compile_refusal.cache_clear()
    attention._logged.clear()
    yield calls
    attention.compile_refusal.cache_clear()
    attention._logged.clear()


def _auto(q, k, v, segments=None, spec=SPECS["causal-sliding"], layer_type="sliding_attention"):
    segments = Segments.of(None, None, q.shape[:2]) if segments is None else segments

    def run(q, k, v):
        return attend(q, k, v, spec, segments, scale=0.25, implementation="auto", layer_type=layer_type, block_q=8)

    return jax.jit(run)(q, k, v)


def _reference(q, k, v, segments=None, spec=SPECS["causal-sliding"]):
    segments = Segments.of(None, None, q.shape[:2]) if segments is None else segments
    return attend(q, k, v, spec, segments, scale=0.25, implementation="reference")


def test_auto_takes_cudnn_where_it_compiles_and_logs_once(fake_gpu, caplog):
    caplog.set_level(logging.INFO, logger="bidirlm_jax")
    args = qkv(jnp.bfloat16)
    ref = _reference(*args)
    for _ in range(2):
        np.testing.assert_allclose(np.asarray(_auto(*args), np.float32), np.asarray(ref, np.float32), atol=2e-2)
    _auto(*args, layer_type="full_attention")
    assert attention.compile_refusal.cache_info().misses == 1  # probed once for the shape
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
def test_auto_falls_back_on_any_cudnn_refusal(fake_gpu, monkeypatch, caplog, error):
    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setitem(attention.KERNELS, "cudnn", refuse)
    caplog.set_level(logging.INFO, logger="bidirlm_jax")
    args = qkv(jnp.bfloat16)
    for _ in range(2):
        np.testing.assert_allclose(np.asarray(_auto(*args), np.float32), np.asarray(_reference(*args), np.float32),
                                   atol=2e-2)  # fmt: skip
    assert attention.compile_refusal.cache_info().misses == 1  # cuDNN probed once; chunked needs no probe
    (record,) = caplog.records
    message = record.getMessage()
    assert record.levelno == logging.WARNING and record.name.startswith("bidirlm_jax")
    assert "sliding_attention" in message and type(error).__name__ in message and "chunked kernel" in message
    with pytest.raises(ConfigError, match="attention_impl='cudnn' cannot run here"):
        attend(*args, SPECS["causal"], Segments.of(None, None, (2, T)), scale=0.25, implementation="cudnn")


def test_auto_never_tries_cudnn_in_fp32(fake_gpu):
    _auto(*qkv(jnp.float32))
    assert fake_gpu == []


def test_cudnn_lengths_serve_right_padded_batches_only(fake_gpu, monkeypatch):
    """Padding goes to cuDNN as lengths, exact for right padding only: a batch with a left-padded row
    runs the next kernel (chosen at run time), and both give the reference on real tokens."""
    monkeypatch.setitem(attention.KERNELS, "cudnn", lambda q, k, v, *a: jnp.zeros_like(q))  # recognisable
    q, k, v = qkv(jnp.bfloat16)
    mask = np.ones((2, T), np.int32)
    mask[0, -5:] = 0
    right = Segments.of(mask, None, (2, T))
    assert not np.asarray(_auto(q, k, v, right, SPECS["causal"])).any()  # cuDNN ran
    mask[1, :4] = 0
    left = Segments.of(mask, None, (2, T))
    out = np.asarray(_auto(q, k, v, left, SPECS["causal"]), np.float32)[mask.astype(bool)]
    ref = np.asarray(_reference(q, k, v, left, SPECS["causal"]), np.float32)[mask.astype(bool)]
    np.testing.assert_allclose(out, ref, atol=2e-2)


def test_named_kernels_that_cannot_run_say_why():
    q, k, v = qkv()
    segments = Segments.of(None, None, (2, T))
    with pytest.raises(ConfigError, match="cuDNN needs an NVIDIA GPU"):
        attend(q, k, v, SPECS["causal"], segments, scale=0.25, implementation="cudnn")
    with pytest.raises(ConfigError, match="no sliding window"):
        attend(q, k, v, SPECS["half"], segments, scale=0.25, implementation="triton")
    with pytest.raises(ConfigError, match="multiples of 128"):
        attend(q, k, v, SPECS["half"], segments, scale=0.25, implementation="splash")


def test_a_model_logs_one_choice_per_layer_type(fake_gpu, caplog):
    """4 layers of 2 types: two log lines, and the model runs on the cuDNN path."""
    from flax import nnx

    from bidirlm_jax.models.transformer import Transformer

    caplog.set_level(logging.INFO, logger="bidirlm_jax")
    model = Transformer(CONFIG, Runtime(dtype="bfloat16"), rngs=nnx.Rngs(0))
    nnx.jit(lambda m, ids: m(ids).logits)(model, jnp.ones((2, 16), jnp.int32))
    lines = sorted(r.getMessage() for r in caplog.records)
    assert [line.split()[1] for line in lines] == ["full_attention", "sliding_attention"], lines
    assert len(fake_gpu) >= CONFIG.num_layers
    assert set(layer_specs(CONFIG, model.runtime)) == {"full_attention", "sliding_attention"}
