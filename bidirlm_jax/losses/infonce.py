"""The contrastive loss: cosine InfoNCE with in-batch and hard negatives.

The definition is sentence-transformers' `MultipleNegativesRankingLoss` (which BidirLM trained with, in its
cached form): each query is scored against every positive and every hard negative of the batch, the target
is its own positive, scores are cosines divided by the temperature, and the loss is the mean cross-entropy
over queries, in fp32. Which batch that is depends on `groups`: one group is the global batch (negatives
gathered across the whole mesh); `n` equal groups of consecutive rows reproduce per-device batches
(sentence-transformers' default `gather_across_devices=False`, each device's loss averaged by DDP).

Optionally, candidates whose text equals the query's own positive (duplicates that large single-dataset
batches contain) are excluded from its softmax (sentence-transformers issue #2732); texts are compared by
keys (`text_keys`) rather than strings so that this works inside `jit`.

Metrics (means over queries): `in_batch_accuracy` (the positive scores highest), `positive_cosine`, and
`hardest_negative_cosine` (the largest cosine to any other candidate; -inf for a lone query without
negatives).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bidirlm_jax.errors import ConfigError

_HIGHEST = jax.lax.Precision.HIGHEST  # TPUs multiply fp32 in bf16 passes by default


def contrastive_loss(
    queries: jax.Array, positives: jax.Array, negatives: jax.Array | None = None, *, temperature: float = 0.05
) -> jax.Array:
    """Mean InfoNCE loss over queries: `queries` [B, d], `positives` [B, d], `negatives` [B, K, d] or None,
    unnormalised embeddings; each query's candidates are all B positives and all B·K negatives."""
    return contrastive_loss_and_metrics(queries, positives, negatives, temperature=temperature)[0]


def contrastive_loss_and_metrics(
    queries: jax.Array,
    positives: jax.Array,
    negatives: jax.Array | None = None,
    *,
    temperature: float = 0.05,
    groups: int = 1,
    positive_keys: jax.Array | None = None,
    negative_keys: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) with the batch split into `groups` blocks of consecutive rows, each its own batch
    (the loss is the mean of the blocks' losses). `positive_keys` [B, ...] and `negative_keys` [B, K, ...]
    (e.g. from `text_keys`), when given, exclude every candidate whose key equals the query's positive's."""
    if temperature <= 0:
        raise ConfigError(f"contrastive temperature must be positive, got {temperature}")
    queries, positives = jnp.asarray(queries, jnp.float32), jnp.asarray(positives, jnp.float32)
    b, d = queries.shape
    if positives.shape != (b, d):
        raise ConfigError(f"positives {positives.shape} do not match queries {queries.shape}; both must be [B, d]")
    if negatives is None:
        negatives = jnp.zeros((b, 0, d), jnp.float32)
    negatives = jnp.asarray(negatives, jnp.float32)
    if negatives.ndim != 3 or negatives.shape[0] != b or negatives.shape[2] != d:
        raise ConfigError(f"negatives {negatives.shape} must be [B, K, d] with B={b}, d={d}")
    if groups < 1 or b % groups:
        raise ConfigError(f"cannot split a batch of {b} into {groups} equal groups (one per data-parallel shard)")
    if (positive_keys is None) != (negative_keys is None):
        raise ConfigError("give both positive_keys and negative_keys, or neither")

    split = lambda x: None if x is None else jnp.reshape(x, (groups, b // groups, *x.shape[1:]))
    per_query = jax.vmap(_group, in_axes=(0, 0, 0, 0, 0, None))(
        split(queries), split(positives), split(negatives), split(positive_keys), split(negative_keys), temperature
    )
    loss, metrics = jax.tree.map(jnp.mean, per_query)
    return loss, metrics


def _normalize(x: jax.Array) -> jax.Array:
    """x / max(‖x‖, 1e-12), as torch's `F.normalize` in sentence-transformers' `cos_sim`."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def _group(q, p, n, p_keys, n_keys, temperature: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-query loss and metrics of one batch: q, p [b, d], n [b, K, d]."""
    b = q.shape[0]
    candidates = jnp.concatenate([p, n.reshape(-1, n.shape[-1])])  # [b(1 + K), d]: positives first
    cosine = jnp.einsum("qd,cd->qc", _normalize(q), _normalize(candidates), precision=_HIGHEST)
    own = jnp.arange(b)
    is_positive = jnp.arange(candidates.shape[0])[None, :] == own[:, None]
    excluded = jnp.zeros(cosine.shape, bool)
    if p_keys is not None:
        c_keys = jnp.concatenate([p_keys, n_keys.reshape(-1, *n_keys.shape[2:])])
        same = c_keys[None] == p_keys[:, None]
        excluded = same.reshape(*same.shape[:2], -1).all(axis=-1) & ~is_positive
    scores = jnp.where(excluded, -jnp.inf, cosine / temperature)
    positive_score = scores[own, own]
    loss = jax.nn.logsumexp(scores, axis=1) - positive_score
    negative_cosine = jnp.where(excluded | is_positive, -jnp.inf, cosine)
    metrics = {
        "in_batch_accuracy": (jnp.argmax(scores, axis=1) == own).astype(jnp.float32),
        "positive_cosine": cosine[own, own],
        "hardest_negative_cosine": jnp.max(negative_cosine, axis=1),
    }
    return loss, metrics


def text_keys(ids: jax.Array, mask: jax.Array) -> jax.Array:
    """[..., T] token ids and mask -> [..., 2] uint32 hashes, equal for equal texts padded alike (two
    independent multiplicative hashes: a collision in a batch of 4096 texts has probability ~1e-12)."""
    tokens = (jnp.asarray(ids).astype(jnp.uint32) + 1) * (jnp.asarray(mask) > 0).astype(jnp.uint32)
    t = tokens.shape[-1]
    weights = jax.random.bits(jax.random.key(0), (2, t), jnp.uint32) | jnp.uint32(1)  # odd multipliers
    return jnp.sum(tokens[..., None, :] * weights, axis=-1, dtype=jnp.uint32)
