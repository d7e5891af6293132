"""MNTP: masking statistics, the once-shifted per-segment targets, sparse = dense, and step-0 parity with
transformers' PyTorch models in bidirectional mode."""

import functools

import jax
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import bidirlm_jax
from bidirlm_jax.data.mntp import _random_tokens, mask_tokens
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.losses.mntp import capacity, make_mntp_loss, mntp_loss_from_mask, target_losses
from bidirlm_jax.models.config import FULL, SLIDING
from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.models.runtime import Runtime
from bidirlm_jax.models.transformer import Transformer
from bidirlm_jax.sharding import make_mesh
from bidirlm_jax.testing import reference as hm
from bidirlm_jax.testing.tolerance import fp32_tol
from bidirlm_jax.train.objectives.base import token_sum_grads
from bidirlm_jax.train.objectives.mntp import logged_metrics
from bidirlm_jax.train.state import StateLayout

VOCAB, MASK_ID, BOS = 512, 4, 2
BIDIRECTIONAL = Runtime(attention="bidirectional")
CHUNK = 96  # does not divide the vocabulary
# Two programs scoring the same targets (sparse chunked head vs dense logits, jit vs float64 numpy) regroup
# each target's log-softmax normaliser over the vocabulary: relative to the loss, at most VOCAB eps.
CE_RTOL = fp32_tol(VOCAB)


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
    config = get_preset("tiny-gemma3", final_logit_softcapping=0.5)
    return Transformer(config, BIDIRECTIONAL, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def qwen_untied():
    return Transformer(get_preset("tiny-qwen3", tie_word_embeddings=False), BIDIRECTIONAL, rngs=nnx.Rngs(1))


@nnx.jit
def packed_logits(model, ids, batch):
    """The model's logits on packed rows `ids`, one compiled program (run op by op, each operation compiles apart)."""
    return model(ids, batch["attention_mask"], segment_ids=batch["segment_ids"], positions=batch["positions"]).logits


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
    logits = np.asarray(packed_logits(gemma, corrupted, batch), np.float64)
    pairs = [(0, 2, 3), (0, 6, 7), (0, 13, 14), (0, 26, 27), (1, 4, 5), (1, 30, 31)]  # (row, from i-1, target i)
    logp = _log_softmax(logits)
    expected = -sum(logp[r, j, batch["input_ids"][r, i]] for r, j, i in pairs)
    hits = sum(int(logits[r, j].argmax() == batch["input_ids"][r, i]) for r, j, i in pairs)

    loss, count, metrics = loss_from_mask(gemma, batch, corrupted, masked, slots=slots)
    assert float(count) == len(pairs)
    np.testing.assert_allclose(float(loss), expected, rtol=CE_RTOL)
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
    assert _rel(sparse_loss, dense_loss) <= CE_RTOL
    # Every gradient entry sums over the vocabulary's softmax terms and the 64 positions of the batch, in
    # another order on each path: the whole gradient in L2, and each parameter at its own scale (a wrong or
    # missing one is off by ~1).
    ours, theirs = jax.tree.leaves(nnx.state(sparse_grads)), jax.tree.leaves(nnx.state(dense_grads))
    flat = lambda leaves: np.concatenate([np.ravel(x) for x in leaves]).astype(np.float64)
    grad_rtol = fp32_tol(VOCAB + 2 * 32)
    assert np.linalg.norm(flat(ours) - flat(theirs)) <= grad_rtol * np.linalg.norm(flat(theirs))
    assert max(map(_rel, ours, theirs)) <= grad_rtol
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
    np.testing.assert_allclose(float(loss), (dense.loss * kept).sum(), rtol=CE_RTOL)


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
    # Keys of another document are masked out (exact zeros in the softmax), so only how XLA groups a
    # query's 32 key terms can move these losses; leaked attention would move them as doc B's own move (below).
    np.testing.assert_allclose(after.loss[untouched], before.loss[untouched], rtol=CE_RTOL)
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
    assert total / float(count) == pytest.approx(float(loss), rel=fp32_tol(int(count)))  # positive terms regrouped


def test_each_source_reports_the_mean_loss_of_its_own_targets(gemma):
    """Asymmetric sources (three rows of one, one of the other, all different documents): each source's
    logged loss is the mean over its own targets, computed here in float64 from the model's logits, and
    the two differ from each other and from the global mean."""
    first, second = packed_batch(3), packed_batch(4)
    batch = {k: np.concatenate([first[k], second[k]]) for k in first}
    batch["source"] = np.array([0, 0, 1, 0], np.int32)
    masked = random_mask(batch, seed=7)
    corrupted = corrupt(batch["input_ids"], masked)
    ids, segments = batch["input_ids"], batch["segment_ids"]
    logits = packed_logits(gemma, corrupted, batch)
    logp = _log_softmax(np.asarray(logits, np.float64))
    scored = masked[:, 1:] & (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)  # j predicts j + 1
    nll = -np.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
    row_loss, row_count = (nll * scored).sum(axis=1), scored.sum(axis=1)
    expected = [row_loss[batch["source"] == k].sum() / row_count[batch["source"] == k].sum() for k in range(2)]

    run = nnx.jit(functools.partial(mntp_loss_from_mask, slots=capacity(32, 0.3, 2.0), chunk_size=CHUNK, num_sources=2))
    loss, count, sums = run(gemma, batch, corrupted, masked)
    means = {"loss": float(loss) / float(count), "tokens": float(count)}
    logged = logged_metrics(means | {k: float(v) / float(count) for k, v in sums.items()}, num_sources=2)
    rtol = CE_RTOL
    for k in range(2):
        assert logged[f"tokens/source_{k}"] == row_count[batch["source"] == k].sum()
        assert logged[f"loss/source_{k}"] == pytest.approx(expected[k], rel=rtol), k
    overall = row_loss.sum() / row_count.sum()
    assert abs(expected[0] - expected[1]) > 10 * rtol * overall  # a per-source mean is not the global one
    assert min(abs(e - overall) for e in expected) > 10 * rtol * overall


# Unoptimised CPU code compiles several times faster; the sharded programs' results do not depend on it.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.fixture(scope="module")
def mntp_grads_on():
    """The MNTP objective's gradient program (masks drawn on device, sparse head, per-source sums, two
    micro-batches) on a mesh, from the same initial parameters; each mesh compiled once."""
    config = get_preset("tiny-gemma3", num_layers=2, layer_types=(SLIDING, FULL))
    parts = [packed_batch(seed) for seed in range(4)]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}  # 8 packed rows
    batch["source"] = np.array([0, 1, 1, 0, 0, 0, 1, 0], np.int32)
    loss_fn = make_mntp_loss(mask_id=MASK_ID, ratio=0.3, vocab_size=VOCAB, chunk_size=CHUNK, num_sources=2)
    cache = {}

    def get(mesh_shape):
        if mesh_shape not in cache:
            mesh = make_mesh(*mesh_shape, devices=jax.devices()[: int(np.prod(mesh_shape))])
            layout = StateLayout(config, optax.sgd(1.0), mesh, seed=0, runtime=BIDIRECTIONAL)
            fn = functools.partial(token_sum_grads(loss_fn, grad_accum=2), layout.graphdef)
            with jax.set_mesh(mesh):
                out = jax.jit(fn, compiler_options=FAST_COMPILE)(layout.init().params, batch, jax.random.key(3))
            cache[mesh_shape] = jax.tree.map(np.asarray, out)
        return cache[mesh_shape]

    return get


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2)])
def test_sharded_step_equals_single_device(mesh_shape, mntp_grads_on):
    """Rows split over devices (and parameters over fsdp/tensor) draw the same masks, gather the same
    targets into the sparse head's slots and give the one-device loss, metrics and gradients."""
    ref_loss, ref_grads, ref_count, ref_metrics = mntp_grads_on((1, 1, 1))
    loss, grads, count, metrics = mntp_grads_on(mesh_shape)
    assert count == ref_count > 0  # the same masked targets: counts are exact
    for name in ("masked_accuracy", "mntp_overflow", "tokens/source_0", "tokens/source_1"):
        assert metrics[name] == ref_metrics[name], name  # counts divided by the same count
    # Every gradient and loss sums over the batch's 8×32 tokens, in another order on another mesh.
    tol = fp32_tol(8 * 32)
    assert loss == pytest.approx(ref_loss, rel=tol)
    for name in ("loss/source_0", "loss/source_1"):
        assert metrics[name] == pytest.approx(ref_metrics[name], rel=tol), name
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * np.abs(b).max())


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
    assert abs(float(loss) / float(count) - theirs) <= 1e-4 * abs(theirs)  # the parity contract (fp32)
