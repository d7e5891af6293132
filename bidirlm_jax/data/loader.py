"""Global, sharded batches from a dataset of rows, each process reading only the rows its devices hold.

A run's data is a grain `MapDataset` whose element `i` is global row `i` (a dict of arrays, one
example), the same on every process; batch `b` is rows `[b·B, (b+1)·B)`. The batch sharding splits rows
over the `data` × `fsdp` mesh axes, and which rows a process's devices hold depends on the mesh and
the device order, not on the process index: all of them when `tensor` spans processes, shards shared
with other processes, or a slice of its own. So each process reads exactly the rows of the shards its
devices hold, and `jax.make_array_from_callback` hands every device its rows: every device of a shard
sees the same rows, on any mesh × process layout.

The position in the stream is the batch index, and a run takes one batch per step, so a resumed run
starts at its step — with any process count or mesh.
"""

from __future__ import annotations

from collections.abc import Mapping

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bidirlm_jax import sharding


def local_row_ranges(mesh: Mesh, global_batch: int) -> list[tuple[int, int]]:
    """The `[start, stop)` row ranges of a global batch that this process's devices hold, sorted, merged."""
    indices = sharding.batch_sharding(mesh, 1).addressable_devices_indices_map((global_batch,))
    ranges: list[tuple[int, int]] = []
    for start, stop, _ in sorted({index[0].indices(global_batch) for index in indices.values()}):
        if ranges and start <= ranges[-1][1]:
            ranges[-1] = (ranges[-1][0], max(stop, ranges[-1][1]))
        else:
            ranges.append((start, stop))
    return ranges


class _LocalBatches:
    """Random-access source: element `b` is this process's rows of global batch `b`, stacked per key."""

    def __init__(self, rows: grain.MapDataset, ranges: list[tuple[int, int]], global_batch: int):
        self._rows, self._ranges, self._batch = rows, ranges, global_batch

    def __len__(self) -> int:
        return len(self._rows) // self._batch

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        first = index * self._batch
        picked = [self._rows[first + r] for start, stop in self._ranges for r in range(start, stop)]
        return {k: np.stack([np.asarray(row[k]) for row in picked]) for k in picked[0]}


class DeviceBatches:
    """Iterates global batches (`jax.Array`s in the batch sharding of `mesh`) of `rows`, from batch `start`.

    `rows` is any grain `MapDataset` of per-row examples; it must hold at least one batch.
    """

    def __init__(
        self,
        rows: grain.MapDataset,
        mesh: Mesh,
        global_batch: int,
        *,
        start: int = 0,
        read_threads: int = 2,
        prefetch: int = 4,
    ):
        self._batch, self._mesh = global_batch, mesh
        self._rows_axes = sharding.batch_sharding(mesh, 1).spec[0]  # the batch axes, as the rules name them now
        ranges = local_row_ranges(mesh, global_batch)
        # global row -> its row in the local batch (ranges are stacked in order)
        self._local_start = dict(zip((a for a, _ in ranges), np.cumsum([0] + [b - a for a, b in ranges]).tolist()))
        self.shapes = {
            k: jax.ShapeDtypeStruct(
                (global_batch, *np.shape(v)),
                np.asarray(v).dtype,
                sharding=sharding.batch_sharding(mesh, np.ndim(v) + 1),
            )
            for k, v in rows[0].items()
        }
        local = grain.MapDataset.source(_LocalBatches(rows, ranges, global_batch))[start:]
        options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
        self._iterator = iter(local.to_iter_dataset(options))

    def _global(self, local: np.ndarray) -> jax.Array:
        def shard(index):
            lo, hi, _ = index[0].indices(self._batch)
            begin = max(a for a in self._local_start if a <= lo)
            at = self._local_start[begin] + lo - begin
            return local[(slice(at, at + hi - lo), *index[1:])]

        # rows over the batch axes; this batch's own row shape and keys (datasets may differ: hard negatives,
        # media slots), so the sharding is built per array, not taken from the first batch
        where = NamedSharding(self._mesh, PartitionSpec(self._rows_axes, *[None] * (local.ndim - 1)))
        return jax.make_array_from_callback((self._batch, *local.shape[1:]), where, shard)

    def __iter__(self) -> DeviceBatches:
        return self

    def __next__(self) -> Mapping[str, jax.Array]:
        local = next(self._iterator)
        return {k: self._global(v) for k, v in local.items()}
