"""The contrastive loss on fixed embeddings: a numpy reference, sentence-transformers' own loss, metrics,
duplicate masking, global vs local gathering on 8 fake devices, and the objective's FLOPs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bidirlm_jax import sharding
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.models.transformer import abstract_model
from bidirlm_jax.train.infonce import (
    contrastive_flops_per_step,
    contrastive_loss,
    contrastive_loss_and_metrics,
    text_keys,
)


def _embeddings(b: int, k: int, d: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, d)).astype(np.float32)
    p = (q + 0.8 * rng.normal(size=(b, d))).astype(np.float32)  # positives correlate with their query
    n = rng.normal(size=(b, k, d)).astype(np.float32) * rng.uniform(0.5, 3, (b, k, 1)).astype(np.float32)
    return q, p, n


def _reference(q, p, n, temperature=0.05, exclude=None):
    """Per-query losses and cosines, float64: candidates = all positives, then all negatives row by row."""
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    q, p, n = (np.asarray(x, np.float64) for x in (q, p, n))
    cosine = unit(q) @ unit(np.concatenate([p, n.reshape(-1, q.shape[1])])).T
    scores = cosine / temperature
    if exclude is not None:
        scores = np.where(exclude, -np.inf, scores)
    top = scores.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(scores - top).sum(axis=1)) + top[:, 0]
    own = np.arange(len(q))
    return log_z - scores[own, own], cosine, scores


@pytest.mark.parametrize("k", [0, 1, 7])
def test_equals_numpy_reference(k):
    q, p, n = _embeddings(6, k)
    losses, cosine, scores = _reference(q, p, n)
    negatives = n if k else None
    np.testing.assert_allclose(contrastive_loss(q, p, negatives), losses.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        contrastive_loss(q, p, negatives, temperature=0.5), _reference(q, p, n, 0.5)[0].mean(), atol=1e-6, rtol=1e-6
    )
    loss, metrics = contrastive_loss_and_metrics(q, p, negatives)
    own = np.arange(6)
    hardest = np.where(np.arange(cosine.shape[1])[None] == own[:, None], -np.inf, cosine).max(axis=1)
    np.testing.assert_allclose(loss, losses.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["in_batch_accuracy"], (scores.argmax(axis=1) == own).mean())
    np.testing.assert_allclose(metrics["positive_cosine"], cosine[own, own].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["hardest_negative_cosine"], hardest.mean(), rtol=1e-5)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_equals_sentence_transformers(k):
    torch = pytest.importorskip("torch")
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    q, p, n = _embeddings(8, k, seed=1)
    theirs = MultipleNegativesRankingLoss(model=None, scale=20.0)  # scale 20 = temperature 0.05
    columns = [torch.from_numpy(q), torch.from_numpy(p)] + [torch.from_numpy(n[:, j].copy()) for j in range(k)]
    expected = theirs.compute_loss_from_embeddings(columns, labels=None).item()
    np.testing.assert_allclose(contrastive_loss(q, p, n if k else None, temperature=0.05), expected, rtol=1e-5)


def test_duplicate_texts_are_not_negatives():
    q, p, n = _embeddings(4, 1, seed=2)
    p[2] = p[0]
    keys = np.arange(8, dtype=np.uint32).reshape(4, 2)  # one key per document: rows' positives, then negatives
    pos_keys, neg_keys = keys[:, 0].copy(), keys[:, 1:].copy()
    pos_keys[2] = pos_keys[0]  # the duplicate positive
    neg_keys[3, 0] = pos_keys[1]  # row 3's negative is row 1's positive text
    candidates = np.concatenate([pos_keys, neg_keys.reshape(-1)])
    exclude = (candidates[None] == pos_keys[:, None]) & (np.arange(8)[None] != np.arange(4)[:, None])
    assert exclude.sum() == 3
    loss, _ = contrastive_loss_and_metrics(q, p, n, positive_keys=pos_keys, negative_keys=neg_keys)
    np.testing.assert_allclose(loss, _reference(q, p, n, exclude=exclude)[0].mean(), rtol=1e-6)
    assert not np.isclose(loss, contrastive_loss(q, p, n))


def test_text_keys_identify_texts():
    ids = np.array([[5, 6, 7, 0], [5, 6, 7, 0], [5, 6, 0, 0], [5, 6, 8, 0]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0]])
    keys = np.asarray(text_keys(ids, mask))
    assert keys.shape == (4, 2)
    same = (keys[:, None] == keys[None]).all(-1)
    np.testing.assert_array_equal(
        same, np.eye(4, dtype=bool) | np.array([[0, 1, 0, 0], [1, 0, 0, 0]] + [[0] * 4] * 2, bool)
    )


def test_local_groups_are_per_device_batches():
    q, p, n = _embeddings(8, 2, seed=3)
    loss, metrics = contrastive_loss_and_metrics(q, p, n, groups=4)
    parts = [contrastive_loss_and_metrics(q[i : i + 2], p[i : i + 2], n[i : i + 2]) for i in range(0, 8, 2)]
    np.testing.assert_allclose(loss, np.mean([part[0] for part in parts]), rtol=1e-6)
    np.testing.assert_allclose(
        metrics["positive_cosine"], np.mean([part[1]["positive_cosine"] for part in parts]), rtol=1e-6
    )


@pytest.mark.parametrize("gather", ["global", "local"])
def test_on_eight_devices(gather):
    """Sharded over 8 devices: global gathering equals the one-device loss; local equals a loop over the
    8 per-device batches. Gradients with respect to every embedding too."""
    mesh = sharding.make_mesh(data=-1)
    assert mesh.shape["data"] == 8
    q, p, n = _embeddings(16, 2, seed=4)
    groups = 8 if gather == "local" else 1
    fn = jax.value_and_grad(lambda *x: contrastive_loss_and_metrics(*x, groups=groups)[0], argnums=(0, 1, 2))
    with jax.set_mesh(mesh):
        args = [jax.device_put(x, sharding.batch_sharding(mesh, x.ndim)) for x in (q, p, n)]
        loss, grads = jax.jit(fn)(*args)
    assert len(args[0].sharding.device_set) == 8

    def reference(q, p, n):
        if gather == "global":
            return contrastive_loss(q, p, n)
        return jnp.mean(
            jnp.stack([contrastive_loss(q[i : i + 2], p[i : i + 2], n[i : i + 2]) for i in range(0, 16, 2)])
        )

    device = jax.devices()[0]
    ref_loss, ref_grads = jax.value_and_grad(reference, argnums=(0, 1, 2))(
        *(jax.device_put(x, device) for x in (q, p, n))
    )
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_bad_inputs():
    q, p, n = _embeddings(4, 1)
    with pytest.raises(ConfigError, match="temperature must be positive"):
        contrastive_loss(q, p, temperature=0.0)
    with pytest.raises(ConfigError, match="do not match queries"):
        contrastive_loss(q, p[:3])
    with pytest.raises(ConfigError, match=r"negatives .* must be \[B, K, d\]"):
        contrastive_loss(q, p, n[:, 0])
    with pytest.raises(ConfigError, match="into 3 equal groups"):
        contrastive_loss_and_metrics(q, p, groups=3)


def test_flops_count_every_text_forward_and_backward():
    config = get_preset("tiny-qwen3", attention="bidirectional")
    _, state = abstract_model(config)
    matrices = sum(
        x.size for path, x in nnx.to_flat_state(state) if x.ndim >= 2 and "embedder" not in map(str, path)
    )  # every matmul weight outside the (tied) embedding, which an encoder never multiplies by
    b, k, lq, ld = 4, 2, 16, 32
    attention = lambda t: config.num_layers * 4 * config.num_heads * config.head_dim * t * t
    forward = b * (2 * matrices * lq + attention(lq)) + b * (1 + k) * (2 * matrices * ld + attention(ld))
    plain = contrastive_flops_per_step(config, batch_size=b, query_len=lq, doc_len=ld, num_negatives=k, chunked=False)
    cached = contrastive_flops_per_step(config, batch_size=b, query_len=lq, doc_len=ld, num_negatives=k, chunked=True)
    assert plain == pytest.approx(3 * forward) and cached == pytest.approx(4 * forward)
