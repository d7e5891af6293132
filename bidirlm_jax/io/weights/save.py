"""Writing any list of weight tables into safetensors shards, one tensor at a time.

In a multi-process run every process calls this: each tensor is gathered to process 0, which writes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from bidirlm_jax.io.layouts import Layout
from bidirlm_jax.io.shards import DEFAULT_MAX_SHARD_BYTES, ShardWriter, TensorSpec
from bidirlm_jax.io.weights.table import Table, dtype_key


def param_arrays(module: nnx.Module) -> dict[tuple, jax.Array]:
    """Every parameter of `module` by its path."""
    return {path: var[...] for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def to_host(array: jax.Array) -> np.ndarray:
    """The whole array on this host; a collective when other processes hold parts of it."""
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def write_tables(
    out_dir: Path,
    module: nnx.Module,
    layout: Layout,
    tables: Sequence[Table],
    *,
    dtype: np.dtype,
    tensor_dtypes: Mapping[str, str] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[TensorSpec]:
    """Write `module`'s parameters under `layout`'s keys into `out_dir`'s shards (process 0 writes).

    Tensors are stored in `dtype`, except those `tensor_dtypes` names (by `dtype_key`). Returns
    the written tensors' specs, in order."""
    arrays = param_arrays(module)
    tensor_dtypes = tensor_dtypes or {}
    rows = [(t, e) for t in tables for e in t.entries]
    specs = [
        TensorSpec(
            layout.key(t.component, e.hf_key),
            e.hf_shape,
            np.dtype(jnp.dtype(tensor_dtypes.get(dtype_key(t.component, e.hf_key), dtype))),
        )
        for t, e in rows
    ]
    writer = ShardWriter(out_dir, specs, max_shard_bytes=max_shard_bytes) if jax.process_index() == 0 else None
    for (_, e), spec in zip(rows, specs):
        host = to_host(arrays[e.path])
        if writer is not None:
            writer.write(spec.name, e.to_hf(host).astype(spec.dtype, copy=False))
    if writer is not None:
        writer.close()
    return specs
