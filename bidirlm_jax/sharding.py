"""Device mesh and the rules that map logical axis names to mesh axes.

Modules name their parameter axes logically (`embed`, `heads`, `mlp`, ...; see `LOGICAL_RULES`) and
never mention devices. This file turns those names into `PartitionSpec`s for a concrete mesh with axes
`data`, `fsdp`, `tensor`: by default FSDP shards the `embed` side of every matrix, tensor parallelism the
`heads`/`mlp`/`vocab` side, and batches are split over `data` × `fsdp`. The rules are a value a run
declares (`config.mesh.rules`, entered with `use_rules` for the whole run: sequence parallelism splits
`seq`, a tower brings its own axis names) over these defaults. A dimension that a mesh axis
does not divide stays replicated on that axis (Gemma3-270M's single KV head on `tensor=2`, say); the
train state's layout logs each such parameter kind once, with the memory the replication costs.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from bidirlm_jax.errors import ConfigError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Mapping[str, tuple[str, ...]]  # logical axis -> the mesh axes it is split over (in order)

# The default rules; a run changes them with `use_rules`.
LOGICAL_RULES: Rules = MappingProxyType(
    {
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
)
_active: list[Rules] = [LOGICAL_RULES]


def make_rules(overrides: Mapping[str, Sequence[str]] | None = None) -> Rules:
    """The default rules with `overrides` (`{"seq": ("tensor",)}`, a tower's own axis names) applied, checked."""
    rules = dict(LOGICAL_RULES)
    for name, axes in dict(overrides or {}).items():
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown or len(set(axes)) != len(axes):
            raise ConfigError(
                f"mesh.rules.{name}={axes}: each logical axis splits over distinct mesh axes among {MESH_AXES}; "
                f"fix --config.mesh.rules.{name}"
            )
        rules[name] = axes
    return MappingProxyType(rules)


def current_rules() -> Rules:
    """The rules in force: the innermost `use_rules`, else `LOGICAL_RULES`."""
    return _active[-1]


@contextlib.contextmanager
def use_rules(overrides: Mapping[str, Sequence[str]] | None) -> Iterator[Rules]:
    """Shardings computed inside (train state, batches, activation hints traced inside) follow the default
    rules with `overrides`. A plain module-level stack rather than a context variable, so the threads a run
    starts (the batch reader) see the run's rules."""
    _active.append(make_rules(overrides))
    try:
        yield _active[-1]
    finally:
        _active.pop()


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `data × fsdp × tensor` mesh; one size may be -1 to take the remaining devices.

    Devices are ordered by `jax.make_mesh` (TPU torus / GPU topology aware, `tensor` innermost), among
    `devices` when given. On several TPU slices, `data` is split over the slices (DCN) first.
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = list(mesh_shape(data, fsdp, tensor, len(devices)).values())
    auto = (AxisType.Auto,) * len(MESH_AXES)  # jax.make_mesh defaults to explicit axes; the rules need auto ones
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices == 1:
        return jax.make_mesh(sizes, MESH_AXES, axis_types=auto, devices=devices)
    if sizes[0] % slices:
        raise ConfigError(
            f"mesh data={sizes[0]} does not split over the {slices} TPU slices; make mesh.data a multiple of {slices}"
        )
    per_slice = (sizes[0] // slices, sizes[1], sizes[2])
    grid = mesh_utils.create_hybrid_device_mesh(per_slice, (slices, 1, 1), devices)
    return Mesh(grid, MESH_AXES, axis_types=auto)


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> dict[str, int]:
    """`{"data", "fsdp", "tensor"}` sizes over `num_devices` devices (one size may be -1: the rest), checked
    without devices, so that a launcher can check a mesh for the slice it will get."""
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ConfigError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if known <= 0 or num_devices % known:
        raise ConfigError(
            f"mesh data={data} fsdp={fsdp} tensor={tensor} does not divide the {num_devices} available devices; "
            "choose sizes whose product divides the device count"
        )
    sizes = [num_devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} uses {math.prod(sizes)} devices but "
            f"{num_devices} are available; set one axis to -1 to use them all"
        )
    return dict(zip(MESH_AXES, sizes))


def _spec_and_dropped(
    names: Sequence[str | None], shape: Sequence[int], mesh: Mesh
) -> tuple[PartitionSpec, list[tuple[str, int, str]]]:
    """The spec, and the `(logical name, dim, mesh axis)` splits the rules asked for but the dim refused."""
    spec, dropped = [], []
    used: set[str] = set()
    for name, dim in zip(names, shape):
        axes = []
        for axis in current_rules().get(name, ()) if name else ():
            size = mesh.shape[axis]
            if axis in used or size == 1:
                continue
            if dim % (math.prod(mesh.shape[a] for a in axes) * size):
                dropped.append((name, dim, axis))
                continue
            axes.append(axis)
        used.update(axes)
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*spec), dropped


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for an array whose axes carry `names`, dropping mesh axes that do not divide."""
    return _spec_and_dropped(names, shape, mesh)[0]


def variable_sharding(variable: nnx.Variable, mesh: Mesh) -> NamedSharding:
    names = variable.get_metadata().get("out_sharding") or ()
    return NamedSharding(mesh, logical_to_spec(names, variable.shape, mesh))


def place(module: nnx.Module, mesh: Mesh | None) -> nnx.Module:
    """`module` with every variable moved into the sharding its logical axes give on `mesh` (None: as is)."""
    if mesh is None:
        return module
    graphdef, state = nnx.split(module)
    moved = jax.tree.map(
        lambda v: v.replace(jax.device_put(v.get_value(), variable_sharding(v, mesh))),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return nnx.merge(graphdef, moved)


def _kind(path) -> str:
    """A parameter's name without its layer index or container: `k_proj`, `embedding`."""
    names = [k.key if hasattr(k, "key") else getattr(k, "name", None) for k in path]
    return next((n for n in reversed(names) if isinstance(n, str)), "?")


def _size(num_bytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes:.0f} B"


def _log_replicated(costs: dict[str, list], mesh: Mesh) -> None:
    for kind, (dropped, count, extra) in sorted(costs.items()):
        splits = ", ".join(f"{name}={dim} over {axis}={mesh.shape[axis]}" for name, dim, axis in sorted(dropped))
        log.warning(
            "%s: cannot split %s (it does not divide), so it is replicated there: %s more per device over its %d "
            "arrays (parameters and optimizer moments). A mesh axis size that divides it saves the memory",
            kind,
            splits,
            _size(extra),
            count,
        )


def state_shardings(state, mesh: Mesh):
    """NamedShardings for every variable of an (abstract) nnx state, from its logical axis names.

    Works on any pytree holding such variables (a train state with optimizer moments, say): leaves
    outside a variable (step counters, RNG keys) are replicated. Dims that a mesh axis does not divide
    are logged once per parameter kind, with the memory their replication costs.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    costs: dict[str, list] = collections.defaultdict(lambda: [set(), 0, 0.0])  # kind -> [splits, arrays, bytes]

    def place(path, leaf):
        if not isinstance(leaf, nnx.Variable):
            return replicated
        spec, dropped = _spec_and_dropped(leaf.get_metadata().get("out_sharding") or (), leaf.shape, mesh)
        where = NamedSharding(mesh, spec)
        if dropped:
            cost = costs[_kind(path)]
            cost[0].update(dropped)
            cost[1] += 1
            local = math.prod(where.shard_shape(leaf.shape)) * np.dtype(leaf.get_value().dtype).itemsize
            cost[2] += local * (1 - 1 / math.prod(mesh.shape[axis] for _, _, axis in dropped))
        return leaf.replace(where)

    out = jax.tree_util.tree_map_with_path(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    _log_replicated(costs, mesh)
    return out


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Inputs of shape [batch, seq, ...] split over the batch axes."""
    return NamedSharding(mesh, PartitionSpec(current_rules()["batch"], *([None] * (ndim - 1))))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding hint for an activation inside jit on a mesh; a no-op when no mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))
