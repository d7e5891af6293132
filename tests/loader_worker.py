"""One process of a two-process `DeviceBatches` check (a test helper: `python loader_worker.py ID PORT`).

Run with 4 CPU devices per process (global ids 0-3 on process 0, 4-7 on process 1). For every mesh layout
below, every device of every batch shard must hold exactly that shard's rows of the global batch, and
a jitted reduction over the global array must see the whole batch. Prints one line per layout.
"""

import sys

import grain
import jax
import numpy as np

from bidirlm_jax.data.loader import DeviceBatches, local_row_ranges
from bidirlm_jax.sharding import make_mesh

# name -> ((data, fsdp, tensor), device order (0-3: process 0), the rows each process must read)
LAYOUTS = {
    "tensor spans the processes: both hold the one shard": ((1, 1, 8), range(8), ([(0, 8)], [(0, 8)])),
    "fsdp across processes, tensor within: disjoint halves": ((1, 2, 4), range(8), ([(0, 4)], [(4, 8)])),
    "shards 1, 2 shared; 0 on process 0, 3 on process 1": (
        (2, 2, 2),
        [0, 1, 2, 4, 3, 5, 6, 7],
        ([(0, 6)], [(2, 8)]),
    ),
    "shards 0, 2 on process 0; 1, 3 on process 1": (
        (2, 2, 2),
        [0, 1, 4, 5, 2, 3, 6, 7],
        ([(0, 2), (4, 6)], [(2, 4), (6, 8)]),
    ),
}
BATCH, SEQ = 8, 3


def rows() -> grain.MapDataset:
    """Row i: `{"ids": [i, i, i], "weight": i}` after a shuffle, so a row shows where it came from."""
    ds = grain.MapDataset.range(40).shuffle(seed=3).repeat()
    return ds.map(lambda i: {"ids": np.full(SEQ, i, np.int32), "weight": np.float32(i)})


def main(process_id: int, port: int) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    data = rows()
    total = jax.jit(lambda b: (b["ids"].sum(axis=1) * b["weight"]).sum())
    for name, (shape, order, reads) in LAYOUTS.items():
        mesh = make_mesh(*shape, devices=[devices[i] for i in order])
        assert local_row_ranges(mesh, BATCH) == reads[process_id], (name, local_row_ranges(mesh, BATCH))
        batches = DeviceBatches(data, mesh, BATCH, start=2)
        for b in range(2, 5):  # resumed at batch 2, across an epoch boundary (40 rows = 5 batches)
            expected = {k: np.stack([data[b * BATCH + r][k] for r in range(BATCH)]) for k in ("ids", "weight")}
            batch = next(batches)
            for k, array in batch.items():
                assert array.shape == expected[k].shape, (name, k, array.shape)
                for shard in array.addressable_shards:
                    np.testing.assert_array_equal(np.asarray(shard.data), expected[k][shard.index], err_msg=name)
            want = float((expected["ids"].sum(axis=1) * expected["weight"]).sum())
            assert float(total(batch)) == want, (name, float(total(batch)), want)
        print(f"ok {name}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
