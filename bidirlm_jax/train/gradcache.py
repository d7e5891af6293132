"""The contrastive objective's gradient strategy: plain backprop, or GradCache (Gao et al., 2021).

InfoNCE couples every row of the batch (each query's softmax runs over all documents), so the engine's
token-sum accumulation over micro-batches would compute a different, smaller-batch loss. GradCache gives
the exact full-batch gradient with the activations of one chunk alive at a time:

1. embed every text in chunks, keeping only the embeddings (`lax.map`, no gradient);
2. loss and gradient with respect to every embedding, on the whole batch (cheap: [B, d] arrays);
3. re-run each chunk under `jax.vjp`, pull its slice of the embedding gradient back to the parameters,
   and sum over chunks (`lax.scan`).

Cost: 4 forward-equivalents instead of 3. Chunks follow the batch's sharding: `chunk_size` is the number
of rows each data-parallel shard embeds at a time (sentence-transformers' per-GPU `mini_batch_size`), and
every chunk takes `chunk_size` rows from each shard, so no row moves between devices. A shard's last partial
chunk is filled with copies of its last row whose embedding gradient is zero: real rows keep the forward
finite, whereas an all-padding row can make NaNs that survive a zero cotangent (0 · NaN).

Packed chunks (`pack=True`, the default; issue 24): each shard's texts are packed on device several per row
(`train.packed_texts`: no FLOP on padding), and steps 1 and 3 loop over groups of `chunk_size` packed rows,
as many as the texts fill; every text lies whole in one group, so the sums are the padded ones regrouped.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from bidirlm_jax import sharding
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.losses.infonce import contrastive_loss_and_metrics, text_keys
from bidirlm_jax.models.encoder import Inputs, pooled_embeddings, role_inputs
from bidirlm_jax.train.packed_texts import PackedTexts, batch_shards

GATHER_MODES = ("global", "local")


def contrastive_loss_and_grads(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    batch: Mapping[str, jax.Array],
    rng: jax.Array | None = None,
    *,
    chunk_size: int | None = None,
    temperature: float = 0.05,
    pooling: str = "mean",
    gather: str = "global",
    num_shards: int | None = None,
    mask_duplicates: bool = False,
    pack: bool = True,
) -> tuple[jax.Array, nnx.State, dict[str, jax.Array]]:
    """(mean loss, its gradient with respect to `params`, metrics) for one global contrastive batch.

    `batch`: the model inputs of the roles `query` [B, Lq], `positive` [B, Ld] and optionally `negative`
    [B, K, Ld] (`models.encoder.role_inputs`: `query_ids`/`query_mask`, …), and `truncated` [B] (summed
    into the metrics); other fields are ignored. The model is `nnx.merge(graphdef, params)`; its config decides the attention
    mode. `chunk_size=None` is plain backprop through the whole batch (the reference), an integer is
    GradCache. `gather="local"` computes the loss per data-parallel shard; `num_shards` defaults to the
    batch axes of the current mesh (1 off-mesh). `mask_duplicates` drops documents identical to a query's
    positive from its candidates (`contrastive.text_keys`). GradCache packs each shard's texts several per
    row (see the module doc; `pack=False`: one padded text per row). `rng` is unused (the encoder is
    deterministic). Metrics: the loss's (see `contrastive`), `tokens` (real tokens of all texts) and,
    when the batch has the field, `truncated` (texts cut).
    """
    del rng
    if gather not in GATHER_MODES:
        raise ConfigError(f"contrastive.gather {gather!r} is not one of {GATHER_MODES}")
    if chunk_size is not None and chunk_size < 1:
        raise ConfigError(f"contrastive.chunk_size must be a positive number of rows or None, got {chunk_size}")
    queries = role_inputs(batch, "query")
    docs = _documents(batch)
    b = _rows(queries)
    shards = batch_shards() if num_shards is None else num_shards
    if b % shards:
        raise ConfigError(f"the batch of {b} rows does not split over {shards} data-parallel shards")
    k = _rows(docs) // b - 1
    keys = {}
    if mask_duplicates:
        doc_keys = text_keys(docs["input_ids"], docs["attention_mask"]).reshape(b, 1 + k, -1)
        keys = {"positive_keys": doc_keys[:, 0], "negative_keys": doc_keys[:, 1:]}

    def loss_fn(q_emb: jax.Array, d_emb: jax.Array):
        d_emb = d_emb.reshape(b, 1 + k, -1)
        groups = shards if gather == "local" else 1
        return contrastive_loss_and_metrics(
            q_emb, d_emb[:, 0], d_emb[:, 1:], temperature=temperature, groups=groups, **keys
        )

    def embed(p: nnx.State, inputs: Inputs, num_texts: int | None = None) -> jax.Array:
        return pooled_embeddings(nnx.merge(graphdef, p), inputs, pooling, num_texts=num_texts)

    if chunk_size is None:

        def full(p: nnx.State):
            return loss_fn(embed(p, queries), embed(p, docs))

        (loss, metrics), grads = jax.value_and_grad(full, has_aux=True)(params)
    else:
        frozen = jax.lax.stop_gradient(params)
        if pack:
            streams = [PackedTexts(t, shards, chunk_size) for t in (queries, docs)]
            forward = lambda t: _embed_packed(embed, frozen, t)
            backward = lambda t, cot, g: _backward_packed(embed, params, t, cot, g)
        else:
            streams = [queries, docs]
            forward = lambda t: _embed_chunked(embed, frozen, t, shards, chunk_size)
            backward = lambda t, cot, g: _backward_chunked(embed, params, t, cot, g, shards, chunk_size)
        (loss, metrics), cots = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(*map(forward, streams))
        grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)  # summed in fp32
        for texts, cot in zip(streams, cots):
            grads = backward(texts, cot, grads)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    metrics["tokens"] = sum(jnp.sum(t["attention_mask"] > 0, dtype=jnp.float32) for t in (queries, docs))
    if "truncated" in batch:
        metrics["truncated"] = jnp.sum(batch["truncated"], dtype=jnp.float32)
    return loss, grads, metrics


def _rows(inputs: Inputs) -> int:
    return inputs["input_ids"].shape[0]


def _documents(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Positives and negatives as one stream of inputs [B·(1 + K), Ld, ...], row i's documents consecutive
    (so each shard's documents stay on it)."""
    positives, negatives = role_inputs(batch, "positive"), role_inputs(batch, "negative")
    if not negatives:
        return positives

    def stream(p: jax.Array, n: jax.Array) -> jax.Array:
        both = jnp.concatenate([p[:, None], n], axis=1)
        return both.reshape(-1, *both.shape[2:])

    return {key: stream(p, negatives[key]) for key, p in positives.items()}


def _to_chunks(x: jax.Array, shards: int, chunk: int, *, edge: bool) -> jax.Array:
    """[N, ...] → [C, shards·chunk, ...]: chunk c holds rows c·chunk… of every shard's block of N/shards
    rows; a partial last chunk is filled with the shard's last row (`edge`) or zeros."""
    n, rest = x.shape[0], x.shape[1:]
    per = n // shards
    count = -(-per // chunk)
    x = x.reshape(shards, per, *rest)
    fill = [(0, 0), (0, count * chunk - per)] + [(0, 0)] * len(rest)
    x = jnp.pad(x, fill, mode="edge") if edge else jnp.pad(x, fill)
    x = jnp.swapaxes(x.reshape(shards, count, chunk, *rest), 0, 1).reshape(count, shards * chunk, *rest)
    return sharding.constrain(x, (None, "batch") + (None,) * len(rest))


def _from_chunks(y: jax.Array, shards: int, n: int) -> jax.Array:
    """Inverse of `_to_chunks` for [C, shards·chunk, ...] → [N, ...], dropping the filler rows."""
    count, rows, rest = y.shape[0], y.shape[1], y.shape[2:]
    y = jnp.swapaxes(y.reshape(count, shards, rows // shards, *rest), 0, 1)
    return y.reshape(shards, -1, *rest)[:, : n // shards].reshape(n, *rest)


def _input_chunks(texts: Inputs, shards: int, chunk: int) -> dict[str, jax.Array]:
    return {key: _to_chunks(x, shards, chunk, edge=True) for key, x in texts.items()}


def _embed_chunked(embed, params, texts: Inputs, shards: int, chunk_size: int) -> jax.Array:
    n = _rows(texts)
    chunk = min(chunk_size, n // shards)
    embeddings = jax.lax.map(lambda c: embed(params, c), _input_chunks(texts, shards, chunk))
    return _from_chunks(embeddings, shards, n)


def _backward_chunked(embed, params, texts: Inputs, cotangent, grads, shards: int, chunk_size: int) -> nnx.State:
    """`grads` + Σ over chunks of the vjp of `embed` against the chunk's embedding gradient."""
    chunk = min(chunk_size, _rows(texts) // shards)
    xs = (_input_chunks(texts, shards, chunk), _to_chunks(cotangent, shards, chunk, edge=False))

    def step(acc: nnx.State, c) -> tuple[nnx.State, None]:
        inputs, c_cot = c
        _, pullback = jax.vjp(lambda p: embed(p, inputs), params)
        return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, pullback(c_cot)[0]), None

    return jax.lax.scan(step, grads, xs)[0]


def _embed_packed(embed, params, packed: PackedTexts) -> jax.Array:
    """Σ over the used groups of their texts' embeddings [N, d] (every text is in exactly one group; the
    others pool it to exact zeros), in a loop that stops after the last used group."""
    run = lambda j: embed(params, packed.group(j), packed.texts)
    zeros = jnp.zeros(jax.eval_shape(run, 0).shape, jnp.float32)
    return jax.lax.fori_loop(0, packed.count, lambda j, acc: acc + run(j), zeros)


def _backward_packed(embed, params, packed: PackedTexts, cotangent, grads) -> nnx.State:
    """`grads` + Σ over the used groups of the vjp of their embeddings against the embedding gradient."""

    def step(j: jax.Array, acc: nnx.State) -> nnx.State:
        _, pullback = jax.vjp(lambda p: embed(p, packed.group(j), packed.texts), params)
        return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, pullback(cotangent)[0])

    return jax.lax.fori_loop(0, packed.count, step, grads)
