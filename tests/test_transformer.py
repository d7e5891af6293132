"""Logits parity with transformers' PyTorch models (fp32, <= 1e-4 relative), every attention mode.

Sequences are 24 tokens with a sliding window of 8, so sliding layers really cut; each batch has a
right-padded, a left-padded and a full row.
"""

import numpy as np
import pytest
from flax import nnx

import bidirlm_jax
from bidirlm_jax.testing import reference as hm

TOL = 1e-4
BF16_TOL = 3e-2  # bf16 keeps 8 mantissa bits; both sides round at different points


@nnx.jit
def forward(model, ids, mask):
    return model(ids, mask).logits


@nnx.jit
def forward_packed(model, ids, segment_ids, positions):
    return model(ids, segment_ids=segment_ids, positions=positions).logits


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    model = hm.build(hm.gemma3_config())
    return model, hm.save(model, tmp_path_factory.mktemp("gemma3"))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    model = hm.build(hm.qwen3_config())
    return model, hm.save(model, tmp_path_factory.mktemp("qwen3"))


def _parity(ref_model, path, hf_kwargs=None, **load_kwargs):
    ids, mask = hm.batch()
    ours = forward(bidirlm_jax.from_pretrained(path, **load_kwargs), ids, mask)
    theirs = hm.hf_logits(ref_model, ids, mask, **(hf_kwargs or {}))
    return hm.max_rel_err(ours, theirs, mask)


def test_gemma3_causal(gemma):
    assert _parity(*gemma) < TOL


def test_gemma3_bidirectional_half_matches_use_bidirectional_attention(gemma, tmp_path):
    ref = hm.build(hm.gemma3_config(use_bidirectional_attention=True))
    path = hm.save(ref, tmp_path / "bi")
    assert _parity(ref, path) < TOL  # the checkpoint's config says bidirectional/half
    assert _parity(ref, gemma[1], attention="bidirectional") < TOL  # same weights, mode chosen at load


def test_gemma3_bidirectional_full_matches_is_causal_false(gemma):
    assert _parity(*gemma, {"is_causal": False}, attention="bidirectional", bidirectional_window="full") < TOL


def test_gemma3_bidirectional_none_matches_an_unbounded_window(gemma, tmp_path):
    wide = hm.build(hm.gemma3_config(sliding_window=4096))  # same seed: same weights, window wider than T
    err = _parity(wide, gemma[1], {"is_causal": False}, attention="bidirectional", bidirectional_window="none")
    assert err < TOL


def test_window_modes_differ(gemma):
    """Guards the tests above: the three windows must give three different functions here."""
    ids, mask = hm.batch()
    outs = [
        np.asarray(
            forward(bidirlm_jax.from_pretrained(gemma[1], attention="bidirectional", bidirectional_window=w), ids, mask)
        )
        for w in ("half", "full", "none")
    ]
    assert min(np.abs(a - b).max() for a, b in [(outs[0], outs[1]), (outs[1], outs[2])]) > 1e-3


def test_gemma3_untied_with_linear_rope_scaling_and_softcapping(tmp_path):
    cfg = hm.gemma3_config(
        tie_word_embeddings=False,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
        attn_logit_softcapping=2.0,
        final_logit_softcapping=5.0,
    )
    ref = hm.build(cfg)
    path = hm.save(ref, tmp_path / "g")
    assert bidirlm_jax.from_pretrained(path).config.rope_full.factor == 8.0
    assert _parity(ref, path) < TOL
    assert _parity(ref, path, {"is_causal": False}, attention="bidirectional", bidirectional_window="full") < TOL


@pytest.mark.parametrize("tied", [True, False])
def test_qwen3_causal_and_bidirectional(tied, qwen, tmp_path):
    ref, path = qwen
    if not tied:
        ref = hm.build(hm.qwen3_config(tie_word_embeddings=False, attention_bias=True))
        path = hm.save(ref, tmp_path / "untied")
    assert _parity(ref, path) < TOL
    assert _parity(ref, path, {"is_causal": False}, attention="bidirectional") < TOL


def test_qwen3_sliding_layers(tmp_path):
    ref = hm.build(hm.qwen3_config(use_sliding_window=True, sliding_window=hm.WINDOW, max_window_layers=1))
    path = hm.save(ref, tmp_path / "q")
    assert bidirlm_jax.from_pretrained(path).config.layer_types[1:] == ("sliding_attention",) * 2
    assert _parity(ref, path) < TOL
    assert _parity(ref, path, {"is_causal": False}, attention="bidirectional", bidirectional_window="full") < TOL


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_packed_segments_equal_separate_sequences(attention, gemma):
    """Two documents packed in one row, positions restarting: each sees only itself, as if run alone."""
    ref, path = gemma
    model = bidirlm_jax.from_pretrained(path, attention=attention)
    rng = np.random.default_rng(1)
    a, b = rng.integers(3, hm.VOCAB, (1, 14)), rng.integers(3, hm.VOCAB, (1, 10))
    packed = np.concatenate([a, b], axis=1)
    segments = np.array([[1] * 14 + [2] * 10])
    positions = np.array([list(range(14)) + list(range(10))])
    logits = np.asarray(forward_packed(model, packed, segments, positions))
    kwargs = {} if attention == "causal" else {"use_bidirectional_attention": True}
    ref = ref if attention == "causal" else hm.build(hm.gemma3_config(**kwargs))
    for doc, sl in ((a, slice(0, 14)), (b, slice(14, 24))):
        theirs = hm.hf_logits(ref, doc, np.ones_like(doc))
        assert hm.max_rel_err(logits[:, sl], theirs, np.ones_like(doc)) < TOL


@pytest.mark.parametrize("family", ["gemma", "qwen"])
def test_bf16_parity(family, gemma, qwen, tmp_path):
    ref = (gemma if family == "gemma" else qwen)[0]
    import torch

    path = hm.save(hm.build(ref.config), tmp_path / "bf16", dtype=torch.bfloat16)
    ref16 = hm.build(ref.config).to(torch.bfloat16)
    assert _parity(ref16, path, dtype="bfloat16") < BF16_TOL


def test_late_token_changes_first_position_only_when_bidirectional(qwen):
    """Catches a silent fall-back to causal attention."""
    ids, _ = hm.batch()
    changed = ids.copy()
    changed[:, -1] = (changed[:, -1] + 1) % hm.VOCAB
    ones = np.ones_like(ids)
    for attention, moves in (("causal", False), ("bidirectional", True)):
        model = bidirlm_jax.from_pretrained(qwen[1], attention=attention)
        delta = np.abs(np.asarray(forward(model, ids, ones)) - np.asarray(forward(model, changed, ones)))[:, 0].max()
        assert (delta > 1e-6) == moves
