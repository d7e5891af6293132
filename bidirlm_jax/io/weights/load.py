"""Reading any list of weight tables from a checkpoint, and placing them into a module's parameters.

Each tensor is read lazily, checked, converted and put on device (in its mesh sharding when a mesh is
given) before the next is read, so loading holds one tensor on the host at a time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from bidirlm_jax import sharding
from bidirlm_jax.errors import CheckpointError
from bidirlm_jax.io.layouts import Layout
from bidirlm_jax.io.weights.table import Table, WeightEntry

_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # buffers some old checkpoints saved


def _names(names: list[str]) -> str:
    return f"{names[:8]}{' ...' if len(names) > 8 else ''}"


class TensorDict:
    """Arrays already in memory (a state dict as numpy), keyed as a checkpoint keys them: a reader for
    `read_tables`/`load_state`."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self._tensors = dict(tensors)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(np.shape(self._tensors[name]))

    def get(self, name: str) -> np.ndarray:
        return np.asarray(self._tensors[name])


def read_tables(reader, layout: Layout, tables: Sequence[Table]) -> Iterator[tuple[WeightEntry, np.ndarray]]:
    """Yield (entry, tensor in our layout) for every entry of `tables`, after checking that the checkpoint's
    keys of those components are exactly the tables' (names in messages are component-relative)."""
    components = {t.component for t in tables}
    wanted = {(t.component, e.hf_key): e for t in tables for e in t.entries}
    ignored = {(t.component, k) for t in tables for k in t.ignored}
    present = {}
    for key in reader.keys():
        where = layout.locate(key)
        if where is None or where[0] not in components or _IGNORED.search(key):
            continue  # another component (a tower this model does not hold) or a recomputed buffer
        present[where] = key
    unknown = sorted(rel for c, rel in set(present) - set(wanted) - ignored)
    missing = sorted(rel for c, rel in set(wanted) - set(present))
    if unknown or missing:
        raise CheckpointError(
            "checkpoint does not match its config.json: "
            + (f"missing tensors {_names(missing)} " if missing else "")
            + (f"unexpected tensors {_names(unknown)} " if unknown else "")
            + "— check that config.json belongs to these weights"
        )
    bad = [
        f"{present[name]}: {reader.shape(present[name])} but config.json needs {e.hf_shape}"
        for name, e in wanted.items()
        if reader.shape(present[name]) != e.hf_shape
    ]
    if bad:
        raise CheckpointError("tensor shapes disagree with config.json: " + "; ".join(bad[:8]))
    for name, e in wanted.items():
        yield e, e.to_ours(reader.get(present[name]))


def load_state(
    abstract: tuple[nnx.GraphDef, nnx.State],
    reader,
    layout: Layout,
    tables: Sequence[Table],
    *,
    dtype: str,
    mesh: Mesh | None = None,
) -> nnx.Module:
    """The module `abstract` (graph and shape-only state, from `nnx.eval_shape`) describes, every parameter
    read from `reader` in `dtype` through `tables`, which must name each of them."""
    graphdef, state = abstract
    flat = dict(nnx.to_flat_state(state))
    uncovered = {p for p, v in flat.items() if isinstance(v, nnx.Param)} - {e.path for t in tables for e in t.entries}
    if uncovered:
        raise ValueError(f"the weight tables do not name the parameters {sorted(map(str, uncovered))[:8]}")
    target_dtype = jnp.dtype(dtype)
    total = sum(len(t.entries) for t in tables)
    for entry, array in tqdm(
        read_tables(reader, layout, tables), desc="loading", total=total, leave=False, disable=None
    ):
        var = flat[entry.path]
        array = np.asarray(array).astype(target_dtype, copy=False)
        if mesh is None:
            value = jax.device_put(array)
        else:
            target = sharding.variable_sharding(var, mesh)
            value = jax.make_array_from_callback(array.shape, target, lambda idx, a=array: a[idx])
        flat[entry.path] = var.replace(value)
    return nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())))
