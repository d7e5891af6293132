"""Device mesh and the one table that maps logical axis names to mesh axes.

Modules name their parameter axes logically (`embed`, `heads`, `mlp`, ...; see `LOGICAL_RULES`) and
never mention devices. This file turns those names into `PartitionSpec`s for a concrete mesh with axes
`data`, `fsdp`, `tensor`: FSDP shards the `embed` side of every matrix, tensor parallelism the
`heads`/`mlp`/`vocab` side, and batches are split over `data` × `fsdp`. A dimension that a mesh axis
does not divide stays replicated on that axis (Gemma3-270M's single KV head on `tensor=2`, say).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bidirlm_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes it is split over (in order); the only place sharding policy lives.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "seq": (),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "norm": (),
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `data × fsdp × tensor` mesh; one size may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ConfigError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if known <= 0 or len(devices) % known:
        raise ConfigError(
            f"mesh data={data} fsdp={fsdp} tensor={tensor} does not divide the {len(devices)} available devices; "
            "choose sizes whose product divides the device count"
        )
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise ConfigError(
            f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} uses {math.prod(sizes)} devices but "
            f"{len(devices)} are available; set one axis to -1 to use them all"
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for an array whose axes carry `names`, dropping mesh axes that do not divide."""
    spec = []
    used: set[str] = set()
    for name, dim in zip(names, shape):
        axes = []
        for axis in LOGICAL_RULES.get(name, ()) if name else ():
            size = mesh.shape[axis]
            if axis in used or size == 1 or dim % (math.prod(mesh.shape[a] for a in axes) * size):
                continue
            axes.append(axis)
        used.update(axes)
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*spec)


def variable_sharding(variable: nnx.Variable, mesh: Mesh) -> NamedSharding:
    names = variable.get_metadata().get("out_sharding") or ()
    return NamedSharding(mesh, logical_to_spec(names, variable.shape, mesh))


def state_shardings(state, mesh: Mesh):
    """NamedShardings for every variable of an (abstract) nnx state, from its logical axis names.

    Works on any pytree holding such variables (a train state with optimizer moments, say): leaves
    outside a variable (step counters, RNG keys) are replicated.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(
        lambda v: v.replace(variable_sharding(v, mesh)) if isinstance(v, nnx.Variable) else replicated,
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Inputs of shape [batch, seq, ...] split over the batch axes."""
    return NamedSharding(mesh, PartitionSpec(LOGICAL_RULES["batch"], *([None] * (ndim - 1))))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding hint for an activation inside jit on a mesh; a no-op when no mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))
