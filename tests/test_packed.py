"""Packed text batches (several texts per row, segment ids, per-text positions: issue 24) equal the padded
path: pooling per segment in every mode, under left and right padding, through Gemma3's sliding layers with
texts longer than the window; `encode`, a task head's predictions and the packer's own invariants.

Tolerance: packed and padded rows compute each text's tokens with the same weights but softmax and matmul
sums over rows of other shapes, regrouped: fp32_tol(64) = 7.6e-6 relative for the 64-wide layers at
hidden-state scale ~1 (the model's final norm), so 1e-5; a token attending across texts or a wrong
position moves values by ~1e-2 or more (checked below)."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from bidirlm_jax.data.batching import bucket_for, bucket_lengths, pack_rows, packed_batches, pad_rows
from bidirlm_jax.models.config import FULL, POOLING_MODES, SLIDING
from bidirlm_jax.models.encoder import hidden_states, pool_inputs
from bidirlm_jax.models.pooling import pool_segments
from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.models.runtime import Runtime
from bidirlm_jax.models.transformer import Transformer
from bidirlm_jax.testing.tolerance import fp32_tol

TOL = 1e-5  # ~fp32_tol(64): see the module doc
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
BIDIRECTIONAL = Runtime(attention="bidirectional")


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _hidden(graphdef, state, inputs):
    return hidden_states(nnx.merge(graphdef, state), inputs)


@pytest.fixture(scope="module")
def gemma():
    """Gemma3, bidirectional, a sliding layer of window 8 then a global one: texts of up to 20 tokens."""
    config = get_preset("tiny-gemma3", num_layers=2, layer_types=(SLIDING, FULL))
    assert config.sliding_window == 8
    return nnx.split(Transformer(config, BIDIRECTIONAL, rngs=nnx.Rngs(0)))


def _texts(seed=0, lengths=(13, 20, 9, 3, 17, 6, 1, 11)):
    rng = np.random.default_rng(seed)
    return [rng.integers(5, 512, n).astype(np.int32) for n in lengths]


def test_pool_segments_by_hand():
    hidden = np.arange(2 * 5 * 2, dtype=np.float32).reshape(2, 5, 2)
    segments = np.array([[1, 1, 2, 2, 2], [3, 3, 0, 9, 0]])  # 0 padding, 9 > num_texts: a filler token
    h = hidden.reshape(10, 2)
    np.testing.assert_allclose(
        pool_segments(hidden, segments, 4, "mean"), [h[0:2].mean(0), h[2:5].mean(0), h[5:7].mean(0), [0, 0]]
    )
    np.testing.assert_array_equal(pool_segments(hidden, segments, 4, "first"), [h[0], h[2], h[5], [0, 0]])
    np.testing.assert_array_equal(pool_segments(hidden, segments, 4, "last"), [h[1], h[4], h[6], [0, 0]])
    poisoned = hidden.copy()
    poisoned[1, 2:] = np.nan  # padding and filler values never reach a text
    for mode in POOLING_MODES:
        assert np.isfinite(pool_segments(poisoned, segments, 4, mode)).all(), mode


def test_pack_rows_best_fit_longest_first():
    # 20 opens a 32-row, 16 a 16-row (full), 10 fills the 32-row's gap, 6 opens a 16-row that 5 and 3 fill
    assert pack_rows([10, 3, 16, 5, 6, 20], (16, 32)) == [(32, [5, 0]), (16, [2]), (16, [4, 3, 1])]


def test_packed_rows_equal_padded_rows_every_pooling_both_sides(gemma):
    graphdef, state = gemma
    texts = _texts()
    t = max(map(len, texts))
    right_ids, right_mask = pad_rows(texts, t, 0)
    left_ids, left_mask = np.zeros_like(right_ids), np.zeros_like(right_mask)
    for i, x in enumerate(texts):  # the same texts, left-padded
        left_ids[i, t - len(x) :], left_mask[i, t - len(x) :] = x, 1
    (batch,) = packed_batches(texts, rows=4, buckets=(32,), pad=0)
    assert batch.inputs["input_ids"].shape[0] < len(texts)  # packed: fewer rows than texts
    packed_hidden = _hidden(graphdef, state, batch.inputs)
    order = np.argsort(batch.texts)  # packed slot of each text
    for ids, mask in ((right_ids, right_mask), (left_ids, left_mask)):
        padded = {"input_ids": ids, "attention_mask": mask}
        padded_hidden = _hidden(graphdef, state, padded)
        for mode in POOLING_MODES:
            want = np.asarray(pool_inputs(padded_hidden, padded, mode))
            got = np.asarray(pool_inputs(packed_hidden, batch.inputs, mode, num_texts=batch.num_texts))[order]
            np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL, err_msg=mode)


def test_the_comparison_can_fail(gemma):
    """Dropping the segment ids (attention across texts) moves the packed embeddings far beyond the
    tolerance, and so does the sliding window on these texts (some are longer than it), so the equality
    above covers window ∧ segments. (Per-text positions change nothing beyond rounding under RoPE, which
    is relative; they keep each text's positions as it has them alone.)"""
    graphdef, state = gemma
    (batch,) = packed_batches(_texts(), rows=4, buckets=(32,), pad=0)
    pooled = lambda g, s, inputs: np.asarray(pool_segments(_hidden(g, s, inputs), batch.inputs["segment_ids"], 8))
    reference = pooled(graphdef, state, batch.inputs)
    no_segments = {k: v for k, v in batch.inputs.items() if k != "segment_ids"}
    assert np.abs(pooled(graphdef, state, no_segments) - reference).max() > 1e-2
    config = nnx.merge(graphdef, state).config.replace(layer_types=(FULL, FULL))
    unwindowed, _ = nnx.split(Transformer(config, BIDIRECTIONAL, rngs=nnx.Rngs(0)))
    assert np.abs(pooled(unwindowed, state, batch.inputs) - reference).max() > 1e-2


def test_packed_batches_cover_every_text_in_few_shapes():
    rng = np.random.default_rng(1)
    seqs = [list(rng.integers(5, 99, n)) for n in rng.integers(1, 100, 300)]
    batches = packed_batches(seqs, rows=8, buckets=bucket_lengths(128), pad=7)
    assert sorted(i for b in batches for i in b.texts) == list(range(300))
    real, by_length = sum(map(len, seqs)), sorted(map(len, seqs), reverse=True)
    padded = sum(8 * bucket_for(by_length[i], bucket_lengths(128)) for i in range(0, 300, 8))  # pack=False
    packed = sum(b.inputs["input_ids"].size for b in batches)
    assert real / packed > real / padded + 0.08  # 0.89 against 0.78 of the tokens real
    for b in batches:
        ids, seg, pos = (b.inputs[k] for k in ("input_ids", "segment_ids", "positions"))
        for k, (i, (row, start)) in enumerate(zip(b.texts, b.places)):
            n = len(seqs[i])
            np.testing.assert_array_equal(ids[row, start : start + n], seqs[i])
            np.testing.assert_array_equal(seg[row, start : start + n], k + 1)
            np.testing.assert_array_equal(pos[row, start : start + n], np.arange(n))
        assert b.num_texts >= len(b.texts) and (b.inputs["attention_mask"].sum(1) > 0).all()  # no empty row
    assert len({(b.inputs["input_ids"].shape, b.num_texts) for b in batches}) <= 12


def test_encode_packed_equals_padded(qwen_dir, tmp_path):
    from bidirlm_jax.embed.encode import encode
    from bidirlm_jax.io.hf import from_pretrained
    from bidirlm_jax.io.tokenizer import load_tokenizer
    from tests.test_encode import make_encoder_src

    src = make_encoder_src(qwen_dir, tmp_path / "src")
    model = from_pretrained(src, attention="bidirectional")
    tokenizer = load_tokenizer(src)
    texts = ["a dog", "the quick brown fox jumps over the lazy dog " * 3, "", "cats sleep", "x " * 40]
    for pooling in POOLING_MODES:
        packed = encode(model, tokenizer, texts, pooling=pooling, batch_size=2, max_length=64)
        padded = encode(model, tokenizer, texts, pooling=pooling, batch_size=2, max_length=64, pack=False)
        # unit vectors from the 64-wide layers, regrouped (module doc)
        np.testing.assert_allclose(packed, padded, atol=TOL, err_msg=pooling)
        np.testing.assert_allclose(np.linalg.norm(packed[[0, 1, 3, 4]], axis=1), 1.0, atol=fp32_tol(64))


@pytest.mark.parametrize("task, pooling", [("classification", "late"), ("classification", "first"),
                                           ("regression", "last"), ("token_classification", "mean")])  # fmt: skip
def test_head_predictions_packed_equal_padded(task, pooling):
    from bidirlm_jax.data.labeled_rows import Encoded
    from bidirlm_jax.evals.finetune import predict
    from bidirlm_jax.models.heads import EncoderWithHead, HeadConfig

    config = get_preset("tiny-qwen3", num_layers=1, layer_types=(FULL,))
    head = HeadConfig(
        task, 1 if task == "regression" else 3, pooling=pooling if task != "token_classification" else "mean"
    )
    model = EncoderWithHead(config, head, BIDIRECTIONAL, rngs=nnx.Rngs(0))
    texts = _texts(2)
    offsets = np.cumsum([0] + [len(x) for x in texts])
    labels = np.zeros(offsets[-1] if task == "token_classification" else len(texts), np.int32)
    encoded = Encoded(task, np.concatenate(texts), offsets, labels)
    packed = predict(model, encoded, pad=0, batch_size=4)
    padded = predict(model, encoded, pad=0, batch_size=4, pack=False)
    for i, (a, b) in enumerate(zip(packed, padded)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL, err_msg=f"text {i}")


def test_predict_packs_many_short_examples_into_rows_of_the_floor(monkeypatch):
    """Evaluation packs as `encode` does (`row_floor`): many short examples share rows of `PACKED_ROW_MIN`
    tokens, a few take rows only as long as they need."""
    from bidirlm_jax.data.batching import PACKED_ROW_MIN
    from bidirlm_jax.data.labeled_rows import Encoded
    from bidirlm_jax.evals import finetune
    from bidirlm_jax.models.heads import EncoderWithHead, HeadConfig

    shapes = []
    real = finetune.packed_batches
    record = lambda *a, **k: [shapes.append(b.inputs["input_ids"].shape) or b for b in real(*a, **k)]
    monkeypatch.setattr(finetune, "packed_batches", record)
    config = get_preset("tiny-qwen3", num_layers=1, layer_types=(FULL,))
    model = EncoderWithHead(config, HeadConfig("classification", 2), BIDIRECTIONAL, rngs=nnx.Rngs(0))
    for lengths in ((10,) * 300, (9, 12, 10)):
        shapes.clear()
        texts = _texts(3, lengths)
        offsets = np.cumsum([0] + list(lengths))
        encoded = Encoded("classification", np.concatenate(texts), offsets, np.zeros(len(texts), np.int32))
        assert len(finetune.predict(model, encoded, pad=0, batch_size=8)) == len(lengths)
        if len(lengths) > 3:
            assert {length for _, length in shapes} == {PACKED_ROW_MIN} and len(
                shapes
            ) == 4  # 25 rows of 12 texts: 8+8+8+1
        else:
            assert shapes == [(4, 12)]  # a row each, as long as the longest: none pays for 128 tokens


@pytest.mark.parametrize(
    "task, pooling, accum",
    [("classification", "late", 1), ("regression", "last", 2), ("token_classification", "mean", 1)],
)
def test_finetune_grads_packed_equal_padded(task, pooling, accum):
    """`finetune.pack`: the step's examples packed per row give the padded step's loss, count, metrics and
    gradients (dropout 0), with one group or several (`grad_accum` 2)."""
    from bidirlm_jax.losses.classification import LOSSES
    from bidirlm_jax.models.heads import IGNORE_INDEX, EncoderWithHead, HeadConfig
    from bidirlm_jax.train.objectives.base import token_sum_grads
    from bidirlm_jax.train.packed_texts import packed_token_sum_grads

    config = get_preset("tiny-qwen3", num_layers=1, layer_types=(FULL,))
    sequence = task != "token_classification"
    head = HeadConfig(task, 1 if task == "regression" else 3, pooling=pooling if sequence else "mean")
    graphdef, params = nnx.split(EncoderWithHead(config, head, BIDIRECTIONAL, rngs=nnx.Rngs(0)), nnx.Param)
    texts = _texts(3, lengths=(13, 4, 9, 3, 16, 6))
    ids, mask = pad_rows(texts, 16, 0)
    rng = np.random.default_rng(0)
    if task == "classification":
        labels = rng.integers(0, 3, 6).astype(np.int32)
    elif task == "regression":
        labels = rng.normal(size=6).astype(np.float32)
    else:
        labels = np.where(mask > 0, rng.integers(0, 3, mask.shape), IGNORE_INDEX).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    run = lambda fn: jax.jit(fn, static_argnums=0, compiler_options=FAST_COMPILE)(
        graphdef, params, batch, jax.random.key(0)
    )
    padded = run(token_sum_grads(LOSSES[task], grad_accum=accum))
    packed = run(packed_token_sum_grads(LOSSES[task], grad_accum=accum, sequence=sequence, ignore=IGNORE_INDEX))
    (loss, grads, count, metrics), (ref_loss, ref_grads, ref_count, ref_metrics) = jax.device_get((packed, padded))
    assert count == ref_count and count > 0  # the same examples (tokens) counted once each
    np.testing.assert_allclose(loss, ref_loss, rtol=TOL)
    for name in ref_metrics:
        np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=TOL, atol=TOL, err_msg=name)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
    assert scale > 0 and diff <= TOL * max(scale, 1.0), (diff, scale)


def test_min_length_rows_give_fewer_shapes_each_with_one_num_texts():
    rng = np.random.default_rng(2)
    seqs = [list(rng.integers(5, 99, n)) for n in rng.integers(1, 100, 300)]
    plain = packed_batches(seqs, rows=8, buckets=bucket_lengths(128), pad=7)
    floored = packed_batches(seqs, rows=8, buckets=bucket_lengths(128), pad=7, min_length=50)
    shapes = lambda batches: {b.inputs["input_ids"].shape for b in batches}
    assert min(length for _, length in shapes(floored)) == 64  # the bucket that holds 50 tokens
    assert len(shapes(floored)) < len(shapes(plain))
    assert sorted(i for b in floored for i in b.texts) == list(range(300))
    for batches in (plain, floored):
        num_texts = {}
        for b in batches:
            num_texts.setdefault(b.inputs["input_ids"].shape, set()).add(b.num_texts)
            seg = b.inputs["segment_ids"]
            assert b.num_texts >= len(b.texts)
            assert np.all((seg <= len(b.texts)) | (seg > b.num_texts))  # fillers pool into nothing
        assert all(len(v) == 1 for v in num_texts.values())  # one program per shape


def test_encode_rows_are_long_for_many_texts_and_short_for_a_query():
    from bidirlm_jax.data.batching import PACKED_ROW_MIN
    from bidirlm_jax.embed.encode import _batches

    shapes = lambda lengths: {inputs["input_ids"].shape for _, inputs, _ in _batches(
        [[5] * n for n in lengths], 32, bucket_lengths(512), 0, True)}  # fmt: skip
    assert shapes([10]) == {(1, 16)}  # one query: one row of its own bucket
    assert shapes([10, 12, 9, 11]) == {(4, 16)}  # a few texts: a short row each
    assert min(length for _, length in shapes([10] * 300 + [200])) == PACKED_ROW_MIN
