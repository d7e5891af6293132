"""Logits parity with transformers' PyTorch models (fp32, <= 1e-4 relative), every attention mode.

Sequences are 24 tokens with a sliding window of 8, so sliding layers really cut; each batch has a
right-padded, a left-padded and a full row.
"""

import numpy as np
import pytest

import bidirlm_jax
from bidirlm_jax.testing import reference as hm

TOL = 1e-4
BF16_TOL = 3e-2  # bf16 keeps 8 mantissa bits; both sides round at different points


@pytest.fixture(scope="module")
def gemma(gemma_dir):
    """conftest's Gemma3 directory and the transformers model it was saved from (same seed)."""
    return hm.build(hm.gemma3_config()), gemma_dir


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    """conftest's (untied) Qwen3 directory and the transformers model it was saved from (same seed)."""
    return hm.build(hm.qwen3_config(tie_word_embeddings=False)), qwen_dir


def _parity(ref_model, path, hf_kwargs=None, **load_kwargs):
    ids, mask = hm.batch()
    ours = hm.logits(bidirlm_jax.from_pretrained(path, **load_kwargs), ids, mask)
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
            hm.logits(
                bidirlm_jax.from_pretrained(gemma[1], attention="bidirectional", bidirectional_window=w), ids, mask
            )
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


@pytest.mark.parametrize("variant", ["untied", "tied-with-bias"])
def test_qwen3_causal_and_bidirectional(variant, qwen, tmp_path):
    ref, path = qwen
    if variant == "tied-with-bias":
        ref = hm.build(hm.qwen3_config(tie_word_embeddings=True, attention_bias=True))
        path = hm.save(ref, tmp_path / "tied")
    assert bidirlm_jax.from_pretrained(path).config.tie_word_embeddings == (variant != "untied")
    assert _parity(ref, path) < TOL
    assert _parity(ref, path, {"is_causal": False}, attention="bidirectional") < TOL


def test_qwen3_sliding_layers(tmp_path):
    ref = hm.build(hm.qwen3_config(use_sliding_window=True, sliding_window=hm.WINDOW, max_window_layers=1))
    path = hm.save(ref, tmp_path / "q")
    assert bidirlm_jax.from_pretrained(path).config.layer_types[1:] == ("sliding_attention",) * 2
    assert _parity(ref, path) < TOL
    assert _parity(ref, path, {"is_causal": False}, attention="bidirectional", bidirectional_window="full") < TOL


# Two packed rows of 32 tokens, with padding on either side; documents up to 20 tokens, longer than the
# window of 8: (document lengths, padding before, padding after) per row.
PACKED_ROWS = [((14, 10), 0, 8), ((20, 9), 3, 0)]


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
@pytest.mark.parametrize("family", ["gemma3", "qwen3"])
def test_packed_segments_with_padding_equal_separate_runs(family, attention, gemma, qwen):
    """Documents packed in padded rows, positions restarting: each sees only itself, as transformers run alone."""
    ref, path = gemma if family == "gemma3" else qwen
    hf_kwargs = {}
    if attention == "bidirectional" and family == "gemma3":  # the same weights, transformers' bidirectional flag
        ref = hm.build(hm.gemma3_config(use_bidirectional_attention=True))
    elif attention == "bidirectional":
        hf_kwargs = {"is_causal": False}
    rng = np.random.default_rng(1)
    ids, mask, segments, positions, documents = [], [], [], [], []
    for r, (lengths, before, after) in enumerate(PACKED_ROWS):
        row_docs = [rng.integers(3, hm.VOCAB, n) for n in lengths]
        start = before
        for doc in row_docs:
            documents.append((r, slice(start, start + len(doc)), doc))
            start += len(doc)
        ids.append(np.concatenate([rng.integers(3, hm.VOCAB, before), *row_docs, rng.integers(3, hm.VOCAB, after)]))
        mask.append(np.r_[np.zeros(before), np.ones(start - before), np.zeros(after)])
        segments.append(
            np.concatenate([np.zeros(before), *[np.full(n, s + 1) for s, n in enumerate(lengths)], np.zeros(after)])
        )
        positions.append(np.concatenate([np.zeros(before), *[np.arange(n) for n in lengths], np.zeros(after)]))
    ids, mask, segments, positions = (np.stack(x).astype(np.int32) for x in (ids, mask, segments, positions))
    model = bidirlm_jax.from_pretrained(path, attention=attention)
    logits = np.asarray(model(ids, mask, segment_ids=segments, positions=positions).logits)
    for r, span, doc in documents:
        theirs = hm.hf_logits(ref, doc[None], np.ones((1, len(doc)), np.int64), **hf_kwargs)
        assert hm.max_rel_err(logits[r : r + 1, span], theirs, np.ones((1, len(doc)))) < TOL


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
        delta = np.abs(np.asarray(hm.logits(model, ids, ones)) - np.asarray(hm.logits(model, changed, ones)))[
            :, 0
        ].max()
        assert (delta > 1e-6) == moves
