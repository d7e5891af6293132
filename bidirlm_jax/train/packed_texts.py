"""Padded texts packed several per row on device, inside the jitted step, and the token-sum gradient over
packed groups (issue 24: no padding FLOPs in text batches).

The batch keeps its padded contract (one text per row, the loader's fixed shapes); the step packs it.
Each data-parallel shard's texts, longest first, go into the first of its rows with room (first-fit
decreasing, so the used rows are a prefix); a token keeps its text's order and gets the position it has
alone; text n of the batch is segment n + 1, so pooling into N slots (`models.encoder`) gives the texts
in batch order. Rows left empty hold one filler token of segment N + 1, which pools into nothing, so no
row is all padding. Work then loops over groups of `chunk` packed rows per shard: as many as the texts
fill, a count known only at run time (`lax.fori_loop`), so the only static shape is one group. Every text
lies whole in one group, so sums over groups (embeddings pooled into all N slots, gradients of sums) are
the padded computation regrouped.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from bidirlm_jax import sharding
from bidirlm_jax.losses.base import Batch, LossFn
from bidirlm_jax.models.encoder import Inputs


def batch_shards() -> int:
    """Data-parallel shards of the batch axis on the current mesh under the run's rules (1 off-mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    return math.prod(mesh.shape[a] for a in sharding.current_rules()["batch"] if a in mesh.axis_names)


class PackedTexts:
    """Texts `input_ids`/`attention_mask` [N, L] (either padding side) packed per shard (module doc):
    `inputs` [shards, rows, L], `group(j)` the j-th group of `chunk` rows of every shard, `count` (traced)
    the groups any shard uses, `texts` = N."""

    def __init__(self, texts: Inputs, shards: int, chunk_size: int):
        ids, valid = texts["input_ids"], texts["attention_mask"] > 0
        n, length = ids.shape
        per = n // shards
        self.chunk, self.texts, self.length = min(chunk_size, per), n, length
        self._rows = -(-per // self.chunk) * self.chunk
        fit = functools.partial(_first_fit, rows=self._rows, length=length)
        row, offset, used = jax.vmap(fit)(valid.sum(-1).reshape(shards, per))
        rank = jnp.cumsum(valid, axis=-1, dtype=jnp.int32) - 1  # position of each real token within its text
        start = (row * length + offset).reshape(n, 1)
        self._dest = jnp.where(valid, start + rank, self._rows * length).reshape(shards, -1)  # past the end: dropped
        mask = self.scatter(valid.astype(jnp.int32))
        segment_ids = self.scatter(jnp.arange(1, n + 1, dtype=jnp.int32)[:, None])
        empty = ~mask.any(axis=-1)
        self.inputs = {
            "input_ids": self.scatter(ids),
            "attention_mask": mask.at[..., 0].set(jnp.where(empty, 1, mask[..., 0])),
            "segment_ids": segment_ids.at[..., 0].set(jnp.where(empty, n + 1, segment_ids[..., 0])),
            "positions": self.scatter(rank),
        }
        self.count = (jnp.max(used) + self.chunk - 1) // self.chunk

    def scatter(self, values: jax.Array, fill: int = 0) -> jax.Array:
        """Per-token `values` [N, L] (or broadcasting to it) of the padded texts → [shards, rows, L] packed,
        `fill` where no real token lands."""
        shards = self._dest.shape[0]
        values = jnp.broadcast_to(values, (self.texts, self.length)).reshape(shards, -1)
        size = self._rows * self.length
        place = jax.vmap(lambda d, v: jnp.full(size, fill, v.dtype).at[d].set(v, mode="drop"))
        out = place(self._dest, values).reshape(shards, self._rows, self.length)
        return sharding.constrain(out, ("batch", None, None))

    def take(self, packed: jax.Array, j: jax.Array) -> jax.Array:
        """Rows j·chunk… of every shard of a packed array: [shards·chunk, L], each shard's rows on its devices."""
        rows = jax.lax.dynamic_slice_in_dim(packed, j * self.chunk, self.chunk, axis=1)
        return sharding.constrain(rows.reshape(-1, self.length), ("batch", None))

    def group(self, j: jax.Array) -> dict[str, jax.Array]:
        """The model inputs of group j."""
        return {k: self.take(v, j) for k, v in self.inputs.items()}

    def present(self, group: Inputs) -> jax.Array:
        """[N] float32: 1 for the texts that have tokens in `group`."""
        ids = group["segment_ids"].reshape(-1)
        inside = (ids >= 1) & (ids <= self.texts) & (group["attention_mask"].reshape(-1) > 0)
        hits = jax.ops.segment_sum(inside.astype(jnp.float32), jnp.where(inside, ids - 1, self.texts), self.texts)
        return (hits > 0).astype(jnp.float32)


def _first_fit(lengths: jax.Array, *, rows: int, length: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(row, offset) of each text and the rows used: first-fit decreasing into `rows` rows of `length`."""
    order = jnp.argsort(-lengths, stable=True)

    def place(room: jax.Array, need: jax.Array):
        r = jnp.argmax(room >= need)
        return room.at[r].add(-need), (r, length - room[r])

    room, (row, offset) = jax.lax.scan(place, jnp.full(rows, length, jnp.int32), lengths[order].astype(jnp.int32))
    unsort = lambda x: jnp.zeros_like(x).at[order].set(x)
    return unsort(row), unsort(offset), jnp.sum(room < length)


def packed_token_sum_grads(loss_fn: LossFn, *, grad_accum: int = 1, sequence: bool = True, ignore: int = -100):
    """`objectives.base.token_sum_grads` over packed rows: the batch's texts packed per shard, each group of
    (rows per shard / `grad_accum`) packed rows one accumulation step. Sequence tasks get every text's
    `labels` [N] with `label_weight` [N] marking the group's texts (the loss pools into N slots); token
    tasks get `labels` packed like the tokens (`ignore` elsewhere). Dropout draws per group (`fold_in`)."""

    def grad_fn(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch, rng: jax.Array):
        shards = batch_shards()
        packed = PackedTexts(batch, shards, max(1, batch["input_ids"].shape[0] // shards // grad_accum))
        labels = jnp.asarray(batch["labels"])
        token_labels = None if sequence else packed.scatter(labels, ignore)

        def group(j) -> dict[str, jax.Array]:
            g = packed.group(j)
            if sequence:
                g.update(labels=labels, label_weight=packed.present(g))
            else:
                g["labels"] = packed.take(token_labels, j)
            return g

        def sums(p: nnx.State, g: Batch, key: jax.Array):
            loss, count, metrics = loss_fn(nnx.merge(graphdef, p), g, key)
            return loss, (count, metrics)

        grad_sums = jax.value_and_grad(sums, has_aux=True)
        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_sums, params, group(0), rng))
        body = lambda j, acc: jax.tree.map(jnp.add, acc, grad_sums(params, group(j), jax.random.fold_in(rng, j)))
        (loss, (count, metrics)), grads = jax.lax.fori_loop(0, packed.count, body, zeros)
        denom = jnp.maximum(count, 1.0)
        mean = lambda x: x / denom
        return mean(loss), jax.tree.map(mean, grads), count, {k: mean(v) for k, v in metrics.items()}

    return grad_fn
