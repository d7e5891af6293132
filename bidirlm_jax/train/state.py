"""The train state (params, optimizer state, step, RNG) and its creation directly in its shardings.

Parameters never exist as one full host copy: the abstract state (`jax.eval_shape`) gives every
array's logical axis names, `sharding.state_shardings` turns them into shardings, and the initialiser
is jitted with those as `out_shardings`, so each device materialises only its own shards (what a TPU
pod needs: no host could hold a large model's optimizer state).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

import bidirlm_jax.train.trainable as trainable_lib
from bidirlm_jax import sharding
from bidirlm_jax.io.model_types import model_type_of
from bidirlm_jax.models.config import ModelConfig
from bidirlm_jax.models.runtime import DEFAULT_RUNTIME, Runtime


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: nnx.State  # fp32 master weights
    opt_state: optax.OptState  # over the trainable parameters only
    rng: jax.Array  # raw uint32 key; split once per step


def _state_from(
    params: nnx.State, tx: optax.GradientTransformation, seed: int, trainable: trainable_lib.Filter
) -> TrainState:
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), 1)  # distinct from the parameter-init stream
    opt_state = tx.init(trainable_lib.split(params, trainable)[0])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, rng=rng)


class StateLayout:
    """Where every array of the train state lives, and the two ways to fill it (random or given params).

    `abstract` (shapes, dtypes and shardings, no data) is also the target a checkpoint restores into.
    """

    def __init__(
        self,
        config: ModelConfig,
        tx: optax.GradientTransformation,
        mesh: Mesh,
        *,
        seed: int,
        runtime: Runtime = DEFAULT_RUNTIME,
        model_factory: Callable[[nnx.Rngs], nnx.Module] | None = None,
        trainable: trainable_lib.Filter = nnx.Param,
    ):
        """`model_factory(rngs)` builds the trained module when it is not the model of `config` (a
        `Transformer`, or a model with towers for their configs: `io.model_types`) run as `runtime` says (an
        encoder with a task head); `trainable` selects the parameters the optimizer holds state for."""
        if model_factory is None:
            kind = model_type_of(config)
            self.graphdef, _ = kind.abstract(config, runtime)
            model_factory = lambda rngs: kind.model_class(config, runtime, rngs=rngs)
        else:
            self.graphdef, _ = nnx.split(nnx.eval_shape(lambda: model_factory(nnx.Rngs(0))))
        self._tx, self._seed, self.trainable = tx, seed, trainable

        def init() -> TrainState:
            fresh = nnx.state(model_factory(nnx.Rngs(seed)), nnx.Param)
            return _state_from(fresh, tx, seed, trainable)

        self._init = init
        shapes = jax.eval_shape(init)
        self.shardings = sharding.state_shardings(shapes, mesh)
        self.abstract: TrainState = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, self.shardings
        )

    def init(self) -> TrainState:
        """A randomly initialised state, each device computing only its own shards."""
        return jax.jit(self._init, out_shardings=self.shardings)()

    def from_params(self, params: nnx.State) -> TrainState:
        """A fresh state around given (host) parameters, placed straight into their shardings."""
        placed = jax.device_put(params, self.shardings.params)
        return jax.jit(lambda p: _state_from(p, self._tx, self._seed, self.trainable), out_shardings=self.shardings)(
            placed
        )


def param_shapes(params: nnx.State) -> dict[str, list[int]]:
    """`{"layers/0/attn/q_proj": [d, h, hd], ...}`: what identifies a model's architecture in a checkpoint."""
    return {"/".join(map(str, path)): list(v.shape) for path, v in nnx.to_flat_state(params)}


def optimizer_layout(state: TrainState, trainable: trainable_lib.Filter) -> dict[str, object]:
    """What shapes a checkpoint's optimizer state besides the model: the parameters it holds state for (frozen
    ones hold none) and a digest of its tree (the optimizer's parts, e.g. clipping or not), so a resume can
    refuse another layout by name instead of failing inside orbax's restore."""
    trained = param_shapes(trainable_lib.split(state.params, trainable)[0])
    paths = "\n".join(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0])
    return {"trained": sorted(trained), "tree": hashlib.sha256(paths.encode()).hexdigest()[:16]}
