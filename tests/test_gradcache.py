"""GradCache gives the plain loss and gradients exactly (every pooling mode: sentence-transformers #3862 found
cached gradients silently wrong for some), also on 8 fake devices with global and local gathering. Its chunks
pack several texts per row by default (issue 24); the padded chunks (`pack=False`) stay equal too."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from bidirlm_jax import sharding
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.losses.infonce import contrastive_loss_and_metrics
from bidirlm_jax.models.config import FULL, SLIDING
from bidirlm_jax.models.encoder import role_inputs
from bidirlm_jax.models.pooling import pool
from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.models.runtime import Runtime
from bidirlm_jax.models.transformer import Transformer
from bidirlm_jax.train.gradcache import contrastive_loss_and_grads
from bidirlm_jax.train.packed_texts import PackedTexts

STATIC = ("chunk_size", "temperature", "pooling", "gather", "num_shards", "mask_duplicates", "pack")
# Unoptimised CPU code compiles ~2.5x faster, and these tests are compile-bound
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
loss_and_grads = jax.jit(
    contrastive_loss_and_grads, static_argnums=0, static_argnames=STATIC, compiler_options=FAST_COMPILE
)


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _embed(graphdef, params, ids, mask):
    return pool(nnx.merge(graphdef, params).hidden_states(ids, mask), mask)


@pytest.fixture(scope="module")
def model():
    # XLA's attention compiles fastest on CPU; GradCache's correctness does not depend on the kernel
    config = get_preset("tiny-qwen3", num_layers=1, layer_types=(FULL,))
    runtime = Runtime(attention="bidirectional", attention_impl="xla")
    return nnx.split(Transformer(config, runtime, rngs=nnx.Rngs(0)), nnx.Param)


def _texts(rng, shape):
    """Random ids with random lengths, right padding in even rows and left padding in odd ones."""
    t = shape[-1]
    lengths = rng.integers(2, t + 1, shape[:-1])[..., None]
    right = np.arange(t) < lengths
    left = np.arange(t) >= t - lengths
    rows = (np.arange(shape[0]) % 2 == 0).reshape(-1, *[1] * (len(shape) - 1))
    return rng.integers(3, 512, shape).astype(np.int32), np.where(rows, right, left).astype(np.int32)


def _batch(b: int, k: int, lq: int = 8, ld: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    batch = {}
    batch["query_ids"], batch["query_mask"] = _texts(rng, (b, lq))
    batch["positive_ids"], batch["positive_mask"] = _texts(rng, (b, ld))
    batch["negative_ids"], batch["negative_mask"] = _texts(rng, (b, k, ld))
    return batch


def _assert_same(out, ref, tol=1e-5):
    """GradCache regroups the sums over texts' tokens (<= 18 texts x 12) and the 64-wide layers that plain
    backprop does in one pass: ~fp32_tol(64) = 7.6e-6 relative; a dropped chunk or cotangent is off by ~1."""
    (loss, grads, metrics), (ref_loss, ref_grads, ref_metrics) = jax.device_get((out, ref))
    np.testing.assert_allclose(loss, ref_loss, rtol=tol)
    for name in ref_metrics:
        np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=tol, atol=tol, err_msg=name)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
    assert scale > 0 and diff <= tol * max(scale, 1.0), (diff, scale)


@pytest.mark.parametrize(
    "pooling, chunk_sizes",
    [("mean", (1, 4)), ("last", (4,)), ("first", (4,))],  # 4 divides neither the 6 queries nor 18 documents
)
def test_gradcache_equals_plain(model, pooling, chunk_sizes):
    graphdef, params = model
    batch = _batch(6, 2)
    plain = loss_and_grads(graphdef, params, batch, None, chunk_size=None, pooling=pooling)
    assert np.isfinite(plain[0]) and plain[2]["tokens"] == sum(batch[f].sum() for f in batch if f.endswith("mask"))
    for chunk_size in chunk_sizes:
        _assert_same(loss_and_grads(graphdef, params, batch, None, chunk_size=chunk_size, pooling=pooling), plain)


def test_pairs_without_negatives_and_duplicate_masking(model):
    """K = 0, one chunk holding every row, and a duplicated positive excluded from the other query's softmax."""
    graphdef, params = model
    batch = {k: v for k, v in _batch(4, 1, seed=1).items() if not k.startswith("negative")}
    batch["positive_ids"][1], batch["positive_mask"][1] = batch["positive_ids"][0], batch["positive_mask"][0]
    plain = loss_and_grads(graphdef, params, batch, None, chunk_size=None, mask_duplicates=True)
    _assert_same(loss_and_grads(graphdef, params, batch, None, chunk_size=32, mask_duplicates=True), plain)
    embed = lambda f: _embed(graphdef, params, batch[f"{f}_ids"], batch[f"{f}_mask"])
    keys = np.array([0, 0, 2, 3], np.uint32)
    expected, _ = contrastive_loss_and_metrics(
        embed("query"), embed("positive"), positive_keys=keys, negative_keys=np.zeros((4, 0), np.uint32)
    )
    np.testing.assert_allclose(plain[0], expected, rtol=1e-5)  # as _assert_same: 64-wide layers regrouped


def test_on_eight_devices_global_and_local(model):
    """Batch rows sharded over 8 devices, GradCache with partial chunks on every shard: global gathering
    equals the one-device plain computation; local equals the mean over the 8 per-device batches."""
    graphdef, params = model
    b = 16
    batch = _batch(b, 1, seed=2)
    device = jax.devices()[0]
    on_one = lambda tree: jax.device_put(tree, device)
    reference = {"global": loss_and_grads(graphdef, on_one(params), on_one(batch), None, chunk_size=None)}
    parts = [
        loss_and_grads(
            graphdef, on_one(params), on_one({k: v[i : i + 2] for k, v in batch.items()}), None, chunk_size=None
        )
        for i in range(0, b, 2)
    ]
    reference["local"] = jax.tree.map(lambda *x: jnp.mean(jnp.stack(x), axis=0), *parts)
    reference["local"][2]["tokens"] = reference["global"][2]["tokens"]  # a count, not a mean

    mesh = sharding.make_mesh(data=-1)
    with jax.set_mesh(mesh):
        sharded = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
        replicated = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        for gather in ("global", "local"):
            # 2 queries and 4 documents per shard: chunks of 3 documents leave 2 filler rows on every shard
            out = loss_and_grads(graphdef, replicated, sharded, None, chunk_size=3, gather=gather)
            _assert_same(out, reference[gather])
    assert not np.isclose(reference["global"][0], reference["local"][0])


def test_bad_settings(model):
    graphdef, params = model
    batch = _batch(6, 0)
    with pytest.raises(ConfigError, match="gather 'all' is not one of"):
        contrastive_loss_and_grads(graphdef, params, batch, gather="all")
    with pytest.raises(ConfigError, match="chunk_size must be a positive"):
        contrastive_loss_and_grads(graphdef, params, batch, chunk_size=0)
    with pytest.raises(ConfigError, match="does not split over 4"):
        contrastive_loss_and_grads(graphdef, params, batch, gather="local", num_shards=4)


def test_packed_chunks_fill_fewer_rows_and_keep_every_token():
    """A shard's texts go into fewer rows than texts, each token once, at its position within its text."""
    lengths = [5, 7, 3, 9, 2, 10, 6, 4]  # each shard's 4 texts fill 2 rows of 12 exactly: 9+3, 7+5 | 10+2, 6+4
    ids = np.random.default_rng(3).integers(3, 512, (8, 12)).astype(np.int32)
    mask = np.array([np.roll(np.arange(12) < n, (12 - n) * (i % 2)) for i, n in enumerate(lengths)], np.int32)
    texts = role_inputs({"positive_ids": ids, "positive_mask": mask}, "positive")  # odd rows left-padded
    packed = PackedTexts(texts, 2, 2)  # 2 shards of 4 texts, groups of 2 rows
    out = {k: np.asarray(v).reshape(-1, 12) for k, v in packed.inputs.items()}
    assert int(packed.count) == 1  # one group of 2 rows per shard instead of 2 groups of 2 padded texts
    for n in range(8):
        at = out["segment_ids"] == n + 1
        np.testing.assert_array_equal(out["input_ids"][at], ids[n][mask[n] > 0])
        np.testing.assert_array_equal(out["positions"][at], np.arange(mask[n].sum()))
        shard_rows = slice((n // 4) * 4, (n // 4) * 4 + 2)  # a text stays on its shard, in a used row
        assert at[shard_rows].sum() == mask[n].sum()
    assert (out["attention_mask"].sum(1) > 0).all()  # rows left empty hold a filler token


@pytest.mark.parametrize("pack", [True, False])
def test_gemma_sliding_window_texts_longer_than_it(pack):
    """Gemma3's sliding layer (window 8) with documents of up to 12 tokens: the window combined with the
    segments of packed rows equals each text's own attention, left and right padding (as `_assert_same`)."""
    config = get_preset("tiny-gemma3", num_layers=2, layer_types=(SLIDING, FULL))
    assert config.sliding_window == 8
    runtime = Runtime(attention="bidirectional", attention_impl="xla")
    graphdef, params = nnx.split(Transformer(config, runtime, rngs=nnx.Rngs(0)), nnx.Param)
    batch = _batch(4, 1, seed=4)
    plain = loss_and_grads(graphdef, params, batch, None, chunk_size=None, pooling="first")
    _assert_same(loss_and_grads(graphdef, params, batch, None, chunk_size=2, pooling="first", pack=pack), plain)
