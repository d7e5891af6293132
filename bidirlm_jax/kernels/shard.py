"""Run a per-device attention kernel on each device's shard of the mesh.

Pallas kernels (TPU splash, GPU Triton) are custom calls the compiler cannot partition: under a mesh they
run inside `shard_map`, each device on its rows (batch over `data` × `fsdp`) and its query heads
(`tensor`), by the same logical rules as everything else. KV heads follow their query heads; where the
`tensor` axis cannot split them (Gemma3-270M's single KV head: replicated, MQA) each device keeps them
whole, and where a group of query heads would straddle devices each query head gets its own copy.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from bidirlm_jax.sharding import MESH_AXES, logical_to_spec


def per_device(kernel: Callable[..., jax.Array], q, k, v, ids: jax.Array | None) -> jax.Array:
    """`kernel(q, k, v, ids)` (ids [B, T] or None) on each device's block of rows and heads."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or not set(MESH_AXES) <= set(mesh.axis_names):
        return kernel(q, k, v, ids)
    q_spec = logical_to_spec(("batch", "seq", "heads", "head_dim"), q.shape, mesh)
    kv_spec = logical_to_spec(("batch", "seq", "kv_heads", "head_dim"), k.shape, mesh)
    if q_spec[2] is not None and kv_spec[2] is None and k.shape[2] > 1:
        k, v = (jnp.repeat(x, q.shape[2] // k.shape[2], axis=2) for x in (k, v))
        kv_spec = q_spec
    args, specs = [q, k, v], [q_spec, kv_spec, kv_spec]
    if ids is not None:
        args.append(ids)
        specs.append(PartitionSpec(q_spec[0], None))
    body = kernel if ids is not None else (lambda q, k, v: kernel(q, k, v, None))
    return jax.shard_map(body, mesh=mesh, in_specs=tuple(specs), out_specs=q_spec, check_vma=False)(*args)
