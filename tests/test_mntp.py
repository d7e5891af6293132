"""MNTP: masking statistics, the once-shifted per-segment targets, sparse = dense, and step-0 parity with
transformers' PyTorch models in bidirectional mode."""

import functools

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import bidirlm_jax
from bidirlm_jax.data.mntp import _random_tokens, mask_tokens
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.models.transformer import Transformer
from bidirlm_jax.testing import reference as hm
from bidirlm_jax.train.objectives.base import token_sum_grads
from bidirlm_jax.train.objectives.mntp import (
    capacity,
    logged_metrics,
    make_mntp_loss,
    mntp_loss_from_mask,
    target_losses,
)

VOCAB, MASK_ID, BOS = 512, 4, 2
CHUNK = 96  # does not divide the vocabulary


def packed_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Two packed rows of 32: [doc A (13) | doc B (15) | 4 pads] and [doc C (32)]; BOS opens each doc."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, VOCAB, (2, 32)).astype(np.int32)
    segments = np.array([[1] * 13 + [2] * 15 + [0] * 4, [1] * 32], np.int32)
    positions = np.array([list(range(13)) + list(range(15)) + [0] * 4, list(range(32))], np.int32)
    starts = np.zeros_like(segments, bool)
    starts[:, 0] = True
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    ids[starts & (segments > 0)] = BOS
    ids[segments == 0] = 0
    mask = (segments > 0).astype(np.int32)
    return dict(
        input_ids=ids, segment_ids=segments, positions=positions, attention_mask=mask, maskable=(mask > 0) & ~starts
    )


@pytest.fixture(scope="module")
def gemma():
    """Bidirectional Gemma3 with a logit softcap small enough to bend these logits."""
    config = get_preset("tiny-gemma3", attention="bidirectional", final_logit_softcapping=0.5)
    return Transformer(config, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def qwen_untied():
    return Transformer(get_preset("tiny-qwen3", attention="bidirectional", tie_word_embeddings=False), rngs=nnx.Rngs(1))


@nnx.jit(static_argnames=("slots",))
def loss_from_mask(model, batch, corrupted, masked, slots=None):
    return mntp_loss_from_mask(model, batch, corrupted, masked, slots=slots, chunk_size=CHUNK)


@nnx.jit(static_argnames=("slots",))
def value_and_grads(model, batch, corrupted, masked, slots=None):
    def f(m):
        return mntp_loss_from_mask(m, batch, corrupted, masked, slots=slots, chunk_size=CHUNK)[0]

    return nnx.value_and_grad(f)(model)


@nnx.jit(static_argnames=("slots",))
def per_target(model, batch, corrupted, masked, slots=None):
    return target_losses(model, batch, corrupted, masked, slots=slots, chunk_size=CHUNK)


def corrupt(ids, masked):
    return np.where(masked, MASK_ID, ids).astype(np.int32)


def random_mask(batch, seed=0, ratio=0.3):
    masked = jax.random.bernoulli(jax.random.key(seed), ratio, batch["input_ids"].shape)
    return np.asarray(masked & batch["maskable"])


# --- masking -------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("strategy",))
def draw(keys, ids, maskable, strategy):
    fn = functools.partial(
        mask_tokens, ratio=0.3, mask_id=MASK_ID, vocab_size=VOCAB, strategy=strategy, special_ids=(0, 1, BOS)
    )
    return jax.vmap(lambda k: fn(k, ids, maskable))(keys)


def _within_3_sigma(hits: int, n: int, p: float) -> bool:
    return abs(hits - n * p) <= 3 * np.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("strategy", ["mask", "bert"])
def test_masking_rate_and_eligibility(strategy):
    batch = packed_batch()
    ids, maskable = np.tile(batch["input_ids"], (16, 1)), np.tile(batch["maskable"], (16, 1))
    corrupted, masked = map(np.asarray, draw(jax.random.split(jax.random.key(0), 64), ids, maskable, strategy))
    assert not masked[:, ~maskable].any()  # specials, padding and first tokens never
    assert _within_3_sigma(int(masked.sum()), int(maskable.sum()) * 64, 0.3)
    assert (corrupted[~masked] == np.broadcast_to(ids, masked.shape)[~masked]).all()
    if strategy == "mask":
        assert (corrupted[masked] == MASK_ID).all()


def test_bert_80_10_10():
    batch = packed_batch()
    ids, maskable = np.tile(batch["input_ids"], (16, 1)), np.tile(batch["maskable"], (16, 1))
    corrupted, masked = map(np.asarray, draw(jax.random.split(jax.random.key(1), 64), ids, maskable, "bert"))
    original = np.broadcast_to(ids, masked.shape)[masked]
    seen = corrupted[masked]
    n = seen.size
    allowed = VOCAB - 4  # the vocabulary minus the mask id and the three special ids
    assert _within_3_sigma(int((seen == MASK_ID).sum()), n, 0.8)
    assert _within_3_sigma(int((seen == original).sum()), n, 0.1 + 0.1 / allowed)  # kept, or drawn by chance
    assert _within_3_sigma(int(((seen != MASK_ID) & (seen != original)).sum()), n, 0.1 * (1 - 1 / allowed))
    assert not np.isin(seen[seen != original], [0, 1, BOS]).any()


def test_random_tokens_uniform_over_allowed_ids():
    excluded = [0, 1, 5, 6, 511]
    draws = np.asarray(_random_tokens(jax.random.key(2), (200_000,), VOCAB, excluded))
    counts = np.bincount(draws, minlength=VOCAB)
    assert counts[excluded].sum() == 0
    allowed = np.delete(counts, excluded)
    mean = draws.size / allowed.size
    assert np.abs(allowed - mean).max() <= 5 * np.sqrt(mean)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_mask_ratio_outside_unit_interval(ratio):
    with pytest.raises(ConfigError, match="mask_ratio"):
        make_mntp_loss(mask_id=MASK_ID, ratio=ratio, vocab_size=VOCAB)
    with pytest.raises(ConfigError, match="mask_ratio"):
        mask_tokens(
            jax.random.key(0),
            np.zeros((1, 4), np.int32),
            np.ones((1, 4), bool),
            ratio=ratio,
            mask_id=MASK_ID,
            vocab_size=VOCAB,
        )


def test_mask_id_outside_vocabulary():
    with pytest.raises(ConfigError, match="mask token id"):
        make_mntp_loss(mask_id=VOCAB, ratio=0.3, vocab_size=VOCAB)


# --- the loss ------------------------------------------------------------------------------------------


def _log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("slots", [None, 8])
def test_hand_computed_packed_row(gemma, slots):
    batch = packed_batch()
    masked = np.zeros((2, 32), bool)
    # Row 0: 3 and 7 in doc A; 13 opens doc B (no predecessor: never a target); 14 and 27 in doc B; 29 is padding.
    # Row 1: 0 opens the row; 5 and 31.
    masked[0, [3, 7, 13, 14, 27, 29]] = True
    masked[1, [0, 5, 31]] = True
    corrupted = corrupt(batch["input_ids"], masked)
    logits = np.asarray(
        gemma(
            corrupted, batch["attention_mask"], segment_ids=batch["segment_ids"], positions=batch["positions"]
        ).logits,
        np.float64,
    )
    pairs = [(0, 2, 3), (0, 6, 7), (0, 13, 14), (0, 26, 27), (1, 4, 5), (1, 30, 31)]  # (row, from i-1, target i)
    logp = _log_softmax(logits)
    expected = -sum(logp[r, j, batch["input_ids"][r, i]] for r, j, i in pairs)
    hits = sum(int(logits[r, j].argmax() == batch["input_ids"][r, i]) for r, j, i in pairs)

    loss, count, metrics = loss_from_mask(gemma, batch, corrupted, masked, slots=slots)
    assert float(count) == len(pairs)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    assert float(metrics["masked_accuracy"]) == hits and float(metrics["mntp_overflow"]) == 0


def _rel(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-30))


@pytest.mark.parametrize("model_name", ["gemma", "qwen_untied"])
def test_sparse_chunked_equals_dense(request, model_name):
    model = request.getfixturevalue(model_name)
    batch = packed_batch(1)
    masked = random_mask(batch)
    corrupted = corrupt(batch["input_ids"], masked)
    slots = capacity(32, 0.3, 2.0)  # room for every target of this draw
    dense_loss, dense_grads = value_and_grads(model, batch, corrupted, masked)
    sparse_loss, sparse_grads = value_and_grads(model, batch, corrupted, masked, slots=slots)
    assert _rel(sparse_loss, dense_loss) <= 1e-6
    # fp32 rounding alone puts either path ~1e-6 (max-relative) off the float64 truth (optax's too), so the
    # whole gradient is compared in L2, and each parameter loosely (a wrong or missing one is off by ~1).
    ours, theirs = jax.tree.leaves(nnx.state(sparse_grads)), jax.tree.leaves(nnx.state(dense_grads))
    flat = lambda leaves: np.concatenate([np.ravel(x) for x in leaves]).astype(np.float64)
    assert np.linalg.norm(flat(ours) - flat(theirs)) <= 1e-6 * np.linalg.norm(flat(theirs))
    assert max(map(_rel, ours, theirs)) <= 5e-6
    _, dense_count, dense_metrics = loss_from_mask(model, batch, corrupted, masked)
    _, count, metrics = loss_from_mask(model, batch, corrupted, masked, slots=slots)
    assert float(count) == float(dense_count) and float(metrics["mntp_overflow"]) == 0
    assert float(metrics["masked_accuracy"]) == float(dense_metrics["masked_accuracy"])


def test_overflow_is_counted_and_the_rest_scored(gemma):
    batch = packed_batch(2)
    masked = random_mask(batch, seed=3, ratio=0.5)
    corrupted = corrupt(batch["input_ids"], masked)
    slots = 3
    loss, count, metrics = loss_from_mask(gemma, batch, corrupted, masked, slots=slots)
    dense = jax.tree.map(np.asarray, per_target(gemma, batch, corrupted, masked))
    kept = np.zeros_like(dense.weight)
    for r in range(2):
        kept[r, np.flatnonzero(dense.weight[r])[:slots]] = 1  # the first `slots` targets of each row are kept
    per_row = dense.weight.sum(axis=1)
    assert (per_row > slots).all()
    assert float(metrics["mntp_overflow"]) == np.maximum(per_row - slots, 0).sum()
    assert float(count) == kept.sum()
    np.testing.assert_allclose(float(loss), (dense.loss * kept).sum(), rtol=1e-6)


def test_packed_documents_are_isolated(gemma):
    """Changing doc B of row 0 (its tokens, masked or not) changes no loss of doc A nor of row 1."""
    batch = packed_batch(3)
    masked = random_mask(batch, seed=4, ratio=0.4)
    other = {**batch, "input_ids": batch["input_ids"].copy()}
    in_b = (batch["segment_ids"][0] == 2) & batch["maskable"][0]
    other["input_ids"][0, in_b] = np.random.default_rng(9).integers(5, VOCAB, in_b.sum())
    before = jax.tree.map(np.asarray, per_target(gemma, batch, corrupt(batch["input_ids"], masked), masked, slots=16))
    after = jax.tree.map(np.asarray, per_target(gemma, other, corrupt(other["input_ids"], masked), masked, slots=16))
    np.testing.assert_array_equal(before.position, after.position)
    doc_b = np.zeros_like(before.weight, bool)
    doc_b[0] = batch["segment_ids"][0, before.position[0]] == 2
    untouched = (before.weight > 0) & ~doc_b
    assert untouched[0].any() and untouched[1].any() and (doc_b & (before.weight > 0)).any()
    np.testing.assert_allclose(after.loss[untouched], before.loss[untouched], rtol=1e-6)
    assert not np.allclose(after.loss[doc_b & (before.weight > 0)], before.loss[doc_b & (before.weight > 0)])


def test_objective_through_the_engine_with_sources(gemma):
    """Sums over two micro-batches, divided by the masked count, then `logged_metrics` gives per-source means."""
    batch = {k: np.concatenate([v, v]) for k, v in packed_batch(4).items()}
    batch["source"] = np.array([0, 1, 1, 0], np.int32)
    loss_fn = make_mntp_loss(mask_id=MASK_ID, ratio=0.3, vocab_size=VOCAB, chunk_size=CHUNK, num_sources=2)
    graphdef, params = nnx.split(gemma)
    run = jax.jit(functools.partial(token_sum_grads(loss_fn, grad_accum=2), graphdef))
    loss, _, count, means = run(params, batch, jax.random.key(5))
    again = run(params, batch, jax.random.key(5))
    assert float(again[0]) == float(loss)  # masks come from the key alone
    logged = logged_metrics({"loss": loss, "tokens": count, **means}, num_sources=2)
    assert logged["masked_tokens"] == float(count) > 0 and "tokens" not in logged  # the masked count, named so
    assert logged["mntp_overflow"] == pytest.approx(round(logged["mntp_overflow"]), abs=1e-3)  # a count again
    assert logged["tokens/source_0"] + logged["tokens/source_1"] == pytest.approx(float(count))
    total = sum(logged[f"loss/source_{k}"] * logged[f"tokens/source_{k}"] for k in range(2))
    assert total / float(count) == pytest.approx(float(loss), rel=1e-6)


# --- step-0 parity with transformers ---------------------------------------------------------------------


def _torch_mntp_loss(ref, ids, mask, corrupted, masked, **kwargs) -> float:
    """BidirLM's definition on transformers' logits: logits[:, :-1] predict labels[:, 1:] where masked."""
    with torch.no_grad():
        logits = ref(input_ids=torch.as_tensor(corrupted), attention_mask=torch.as_tensor(mask), **kwargs).logits
    scored = masked[:, 1:] & (mask[:, 1:] > 0) & (mask[:, :-1] > 0)
    labels = torch.as_tensor(np.where(scored, ids[:, 1:], -100))
    return float(
        torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="mean"
        )
    )


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_step0_matches_transformers(family, tmp_path):
    if family == "qwen3":
        ref, kwargs = hm.build(hm.qwen3_config()), {"is_causal": False}
        model = bidirlm_jax.from_pretrained(hm.save(ref, tmp_path), attention="bidirectional")
    else:
        ref, kwargs = hm.build(hm.gemma3_config(use_bidirectional_attention=True, final_logit_softcapping=2.0)), {}
        model = bidirlm_jax.from_pretrained(hm.save(ref, tmp_path))  # bidirectional ("half") from its config
    ids, mask = hm.batch()
    first = np.zeros_like(mask, bool)
    first[np.arange(len(mask)), mask.argmax(axis=1)] = True
    batch = {
        "input_ids": ids.astype(np.int32),
        "attention_mask": mask.astype(np.int32),
        "maskable": (mask > 0) & ~first,
    }
    masked = random_mask(batch, seed=6)
    corrupted = corrupt(ids, masked)
    loss, count, _ = loss_from_mask(model, batch, corrupted, masked, slots=capacity(24, 0.3, 2.0))
    theirs = _torch_mntp_loss(ref, ids, mask, corrupted, masked, **kwargs)
    assert abs(float(loss) / float(count) - theirs) <= 1e-4 * abs(theirs)
