"""The contrastive loss on fixed embeddings: a numpy reference, sentence-transformers' own loss, metrics,
duplicate masking, the objective's own step on meshes (global and local gathering) against one device,
and its FLOPs."""

import functools

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from bidirlm_jax import sharding
from bidirlm_jax.configs import contrastive as contrastive_configs
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.losses.infonce import contrastive_loss, contrastive_loss_and_metrics, text_keys
from bidirlm_jax.models.config import FULL, SLIDING
from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.models.runtime import Runtime
from bidirlm_jax.models.transformer import abstract_model
from bidirlm_jax.testing.tolerance import fp32_tol
from bidirlm_jax.train import build_objective
from bidirlm_jax.train.objectives.contrastive import contrastive_flops_per_step
from bidirlm_jax.train.state import StateLayout

D = 16  # embedding width of these tests


def _loss_tol(candidates: int, temperature: float = 0.05) -> float:
    """Absolute fp32 tolerance of an InfoNCE loss: cosines of D-dim vectors round within ~2D eps (the dot
    and the norms), scores are 1/temperature times them, and the log-sum-exp sums `candidates` terms; the
    loss is that minus one score."""
    return 2 * fp32_tol(2 * D + candidates, 1 / temperature)


COSINE_TOL = fp32_tol(2 * D)  # a cosine (or a mean of cosines) of D-dim vectors: the dot and the norms


def _embeddings(b: int, k: int, d: int = D, seed: int = 0):
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
    tol = _loss_tol(6 * (1 + k))
    np.testing.assert_allclose(contrastive_loss(q, p, negatives), losses.mean(), rtol=0, atol=tol)
    np.testing.assert_allclose(
        contrastive_loss(q, p, negatives, temperature=0.5),
        _reference(q, p, n, 0.5)[0].mean(),
        rtol=0,
        atol=_loss_tol(6 * (1 + k), 0.5),
    )
    loss, metrics = contrastive_loss_and_metrics(q, p, negatives)
    own = np.arange(6)
    hardest = np.where(np.arange(cosine.shape[1])[None] == own[:, None], -np.inf, cosine).max(axis=1)
    np.testing.assert_allclose(loss, losses.mean(), rtol=0, atol=tol)
    assert metrics["in_batch_accuracy"] == (scores.argmax(axis=1) == own).mean()  # a count over 6 queries
    np.testing.assert_allclose(metrics["positive_cosine"], cosine[own, own].mean(), rtol=0, atol=COSINE_TOL)
    np.testing.assert_allclose(metrics["hardest_negative_cosine"], hardest.mean(), rtol=0, atol=COSINE_TOL)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_equals_sentence_transformers(k):
    torch = pytest.importorskip("torch")
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    q, p, n = _embeddings(8, k, seed=1)
    theirs = MultipleNegativesRankingLoss(model=None, scale=20.0)  # scale 20 = temperature 0.05
    columns = [torch.from_numpy(q), torch.from_numpy(p)] + [torch.from_numpy(n[:, j].copy()) for j in range(k)]
    expected = theirs.compute_loss_from_embeddings(columns, labels=None).item()
    ours = contrastive_loss(q, p, n if k else None, temperature=0.05)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=_loss_tol(8 * (1 + k)))  # torch's fp32 vs ours


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
    np.testing.assert_allclose(loss, _reference(q, p, n, exclude=exclude)[0].mean(), rtol=0, atol=_loss_tol(8))
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
    np.testing.assert_allclose(loss, np.mean([part[0] for part in parts]), rtol=0, atol=_loss_tol(6))
    np.testing.assert_allclose(
        metrics["positive_cosine"], np.mean([part[1]["positive_cosine"] for part in parts]), rtol=0, atol=COSINE_TOL
    )


# Unoptimised CPU code compiles several times faster; the sharded programs' results do not depend on it.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
MODEL = get_preset("tiny-gemma3", num_layers=2, layer_types=(SLIDING, FULL))
RUNTIME = Runtime(attention="bidirectional")  # what the contrastive configs declare


@pytest.fixture(scope="module")
def objective_grads(tmp_path_factory):
    """The contrastive objective's own gradient program (stdlib pairs, GradCache with chunks of 2 rows per
    shard, mean pooling) for `gather` on a mesh, from the same initial parameters and global batch."""
    objectives, programs, cache = {}, {}, {}

    def get(gather: str, mesh_shape, rows=slice(None)):
        if gather not in objectives:
            config = contrastive_configs.get_config("tiny")
            config.data.seq_len = 32
            config.contrastive.update(chunk_size=2, gather=gather)
            objectives[gather] = build_objective(config, MODEL, workdir=tmp_path_factory.mktemp("contrastive"))
        objective = objectives[gather]
        if (gather, mesh_shape) not in programs:  # one jitted program (and initial state) per gather and mesh:
            # the eight two-row batches of the local test share its compilation
            mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[: int(np.prod(mesh_shape))])
            layout = StateLayout(MODEL, optax.sgd(1.0), mesh, seed=0, runtime=RUNTIME)
            fn = jax.jit(functools.partial(objective.grad_fn, layout.graphdef), compiler_options=FAST_COMPILE)
            with jax.set_mesh(mesh):
                programs[gather, mesh_shape] = mesh, fn, layout.init().params
        key = (gather, mesh_shape, rows.start)
        if key not in cache:
            mesh, fn, params = programs[gather, mesh_shape]
            batch = {k: np.stack([objective.rows[r][k] for r in range(16)])[rows] for k in objective.rows[0]}
            with jax.set_mesh(mesh):
                cache[key] = jax.tree.map(np.asarray, fn(params, batch, jax.random.key(0)))
        return cache[key]

    return get


def _assert_same_step(ours, theirs, tokens: int) -> None:
    """Scores are cosines of d-dim embeddings pooled over up to 32 tokens, times 1/temperature: that fp32
    rounding bounds the loss (a log-sum-exp of scores minus one) and the cosine metrics; every gradient
    sums over all `tokens` of the batch, at its leaf's scale."""
    loss, grads, count, metrics = ours
    ref_loss, ref_grads, ref_count, ref_metrics = theirs
    assert count == ref_count == tokens
    cosine_tol = fp32_tol(MODEL.hidden_size + 32)
    assert abs(loss - ref_loss) <= 2 * cosine_tol / 0.05
    assert metrics["in_batch_accuracy"] == ref_metrics["in_batch_accuracy"]  # the same argmax per query
    for name in ("positive_cosine", "hardest_negative_cosine"):
        assert abs(metrics[name] - ref_metrics[name]) <= cosine_tol, name
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=fp32_tol(tokens, np.abs(b).max()))


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2)])
def test_objective_step_on_a_mesh_equals_one_device(mesh_shape, objective_grads):
    """Global gathering: the objective's sharded GradCache step (rows over data×fsdp, parameters over
    fsdp/tensor) gives the one-device loss, metrics and gradients."""
    ours, theirs = objective_grads("global", mesh_shape), objective_grads("global", (1, 1, 1))
    _assert_same_step(ours, theirs, tokens=int(theirs[2]))


def test_objective_step_with_local_gathering_is_the_mean_over_device_batches(objective_grads):
    """Local gathering on 8 devices: each device's 2 queries see only their own candidates, so the step is
    the mean of the one-device steps on the 8 two-row batches (token counts add up)."""
    ours = objective_grads("local", (8, 1, 1))
    parts = [objective_grads("local", (1, 1, 1), slice(i, i + 2)) for i in range(0, 16, 2)]
    mean = jax.tree.map(lambda *x: np.mean(np.stack(x), axis=0), *[(p[0], p[1], p[3]) for p in parts])
    _assert_same_step(ours, (mean[0], mean[1], ours[2], mean[2]), tokens=int(sum(p[2] for p in parts)))
    assert abs(ours[0] - objective_grads("global", (8, 1, 1))[0]) > 0.01  # local is not global


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
    config = get_preset("tiny-qwen3")
    _, state = abstract_model(config, Runtime(attention="bidirectional"))
    matrices = sum(
        x.size for path, x in nnx.to_flat_state(state) if x.ndim >= 2 and "embedder" not in map(str, path)
    )  # every matmul weight outside the (tied) embedding, which an encoder never multiplies by
    b, k, lq, ld = 4, 2, 16, 32
    attention = lambda t: config.num_layers * 4 * config.num_heads * config.head_dim * t * t
    forward = b * (2 * matrices * lq + attention(lq)) + b * (1 + k) * (2 * matrices * ld + attention(ld))
    plain = contrastive_flops_per_step(config, batch_size=b, query_len=lq, doc_len=ld, num_negatives=k, chunked=False)
    cached = contrastive_flops_per_step(config, batch_size=b, query_len=lq, doc_len=ld, num_negatives=k, chunked=True)
    assert plain == pytest.approx(3 * forward) and cached == pytest.approx(4 * forward)
