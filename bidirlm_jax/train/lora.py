"""LoRA fine-tuning of a run (`config.lora`, rank > 0): the objective's model gains adapters (`models.lora`) and
only they — and a task head, and any `optim.trainable` regex — train; the base stays frozen in its own dtype.

`adapt` turns any objective (MNTP, contrastive, causal LM, the fine-tuning tasks) into its LoRA form: the model
factory adds adapters and stores the base as `lora.base_dtype` says (`auto`: the dtype `model.init_from`
records, fp32 for a random init); a start from `init_from` gets fresh adapters beside the loaded base; the
gradient strategy stops gradients at the frozen base (no full-size weight gradient is ever formed, whatever
the objective's strategy: micro-batches, GradCache) and opens the adapters' dropout scope. The run records its
adapters in `model/lora.json` (`describe`): their settings and the base they adapt, which checkpoints do not
hold (`Checkpointer(params=...)` saves the trainable parameters only); loading the run for export merges them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from ml_collections import ConfigDict

import bidirlm_jax.train.trainable as trainable_lib
from bidirlm_jax.errors import CheckpointError, ConfigError
from bidirlm_jax.io.run import LORA_FILE
from bidirlm_jax.models import lora
from bidirlm_jax.models.config import ModelConfig
from bidirlm_jax.models.runtime import DTYPES, Runtime
from bidirlm_jax.models.transformer import Transformer
from bidirlm_jax.paths import user_path
from bidirlm_jax.train.objectives.base import GradFn, Objective

HEAD_PATHS = ("head/.*",)  # a task head (`models.heads.EncoderWithHead.head`) trains beside the adapters
_DROPOUT_STREAM = 0x4C6F5241  # folded into the step key: the adapters' dropout draws apart from the objective's


def settings(config: ConfigDict) -> lora.LoRAConfig:
    """The run's adapters (rank 0 or no `lora` section: none)."""
    return lora.LoRAConfig.from_config(config.get("lora"))


def base_dtype(config: ConfigDict) -> str:
    """The frozen base's storage dtype: `lora.base_dtype`, or (`auto`) what `model.init_from` stored."""
    chosen = config.lora.get("base_dtype", "auto")
    if chosen != "auto":
        if chosen not in DTYPES:
            raise ConfigError(
                f"lora.base_dtype={chosen!r} is not one of ('auto', *{DTYPES}); fix --config.lora.base_dtype"
            )
        return chosen
    if not config.model.init_from:
        return "float32"
    path = user_path(config.model.init_from) / "config.json"
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    stored = d.get("dtype") or d.get("torch_dtype") or (d.get("text_config") or {}).get("dtype") or "float32"
    return stored if stored in DTYPES else "float32"


def trainable(optim: ConfigDict) -> trainable_lib.Filter:
    """The adapters, a task head and the `optim.trainable` regexes' parameters, minus the `optim.frozen` ones."""
    chosen = nnx.Any(lora.LoRAParam, trainable_lib.regex_filter((*HEAD_PATHS, *tuple(optim.get("trainable", ())))))
    return nnx.All(chosen, trainable_lib.regex_filter((), tuple(optim.get("frozen", ()))))


def model_factory(
    base: Callable[[nnx.Rngs], nnx.Module],
    adapters: lora.LoRAConfig,
    dtype: str,
    trained: trainable_lib.Filter = lora.LoRAParam,
) -> Callable[[nnx.Rngs], nnx.Module]:
    """`factory(rngs)`: the base factory's model with adapters (drawn after the base's parameters), every parameter
    `trained` does not select (the frozen base) cast to `dtype`."""

    def factory(rngs: nnx.Rngs) -> nnx.Module:
        return lora.cast_frozen(lora.add_adapters(base(rngs), adapters, rngs=rngs), dtype, trained)

    return factory


def with_adapters(
    params: nnx.State, factory: Callable[[nnx.Rngs], nnx.Module], seed: int, dtype: str, trained: trainable_lib.Filter
) -> nnx.State:
    """Loaded parameters (`init_from`, a head) plus the adapters `factory(nnx.Rngs(seed))` draws (the same ones a
    random init gets); the frozen ones cast to `dtype`. Compiled so that only the adapters are computed."""
    # On the host (small): each process holds the whole value, which `StateLayout.from_params` places.
    adapters = jax.device_get(jax.jit(lambda: nnx.state(factory(nnx.Rngs(seed)), lora.LoRAParam))())
    train, frozen = trainable_lib.split(params, trained)
    frozen = jax.tree.map(lambda x: x.astype(dtype), frozen)
    return nnx.merge_state(train, frozen, adapters)


def adapter_grads(grad_fn: GradFn, chosen: trainable_lib.Filter, *, dropout: bool) -> GradFn:
    """`grad_fn` with gradients stopped at the frozen parameters and, with `dropout`, the adapters' masks drawn
    from the step's key."""

    def wrapped(graphdef: nnx.GraphDef, params: nnx.State, batch, rng: jax.Array):
        train, frozen = trainable_lib.split(params, chosen)
        params = nnx.merge_state(train, jax.lax.stop_gradient(frozen))
        if not dropout:
            return grad_fn(graphdef, params, batch, rng)
        with lora.dropout_key(jax.random.fold_in(rng, _DROPOUT_STREAM)):
            return grad_fn(graphdef, params, batch, rng)

    return wrapped


def describe(config: ConfigDict, adapters: lora.LoRAConfig) -> dict[str, Any]:
    """What `model/lora.json` records: the adapters' settings and the base they adapt."""
    base = str(user_path(config.model.init_from).resolve()) if config.model.init_from else ""
    return {**dataclasses.asdict(adapters), "targets": list(adapters.targets), "base": base}


def adapt(
    config: ConfigDict, objective: Objective, model: ModelConfig, runtime: Runtime
) -> tuple[Objective, trainable_lib.Filter]:
    """The LoRA form of `objective` and the filter of the parameters it trains (see the module doc)."""
    adapters = settings(config)
    chosen = trainable(config.optim)
    dtype = base_dtype(config)
    base = objective.model_factory or (lambda rngs: Transformer(model, runtime, rngs=rngs))
    factory = model_factory(base, adapters, dtype, chosen)
    load = objective.init_params or (lambda params: params)
    seed = config.train.seed
    record = json.dumps(describe(config, adapters), indent=2) + "\n"
    adapted = dataclasses.replace(
        objective,
        grad_fn=adapter_grads(objective.grad_fn, chosen, dropout=adapters.dropout > 0),
        model_factory=factory,
        init_params=lambda params: with_adapters(load(params), factory, seed, dtype, chosen),
        run_files={**objective.run_files, LORA_FILE: record},
    )
    return adapted, chosen
