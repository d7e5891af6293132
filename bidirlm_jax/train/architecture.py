"""What a run trains: the architecture (a preset, `init_from`'s, or with `model.towers` the whole model with
its vision/audio towers), its initial parameters, and for tower models how to build and freeze the towers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx
from ml_collections import ConfigDict

from bidirlm_jax.errors import CheckpointError, ConfigError
from bidirlm_jax.io.hf import from_pretrained
from bidirlm_jax.io.hf_config import read_config, read_config_dict
from bidirlm_jax.io.model_types import TEXT_TYPE, described_type, model_type_of
from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.models.runtime import Runtime
from bidirlm_jax.models.towers.presets import TOWER_PRESETS, get_tower_preset
from bidirlm_jax.paths import user_path
from bidirlm_jax.train.config import model_overrides
from bidirlm_jax.train.objectives import Objective


def model_config(model: ConfigDict) -> Any:
    """The architecture to train: the `init_from` checkpoint's or the preset's (how it runs: `run_settings`);
    with `model.towers`, the whole model's (text stack and towers: `Qwen3VLConfig`, `Qwen3ASRConfig`)."""
    overrides = model_overrides(model)
    if model.preset in TOWER_PRESETS and not model.init_from:
        if overrides or not model.get("towers"):
            raise ConfigError(
                f"model.preset={model.preset} has towers: set --config.model.towers=true, without architecture overrides"
            )
        return get_tower_preset(model.preset)
    if not model.init_from:
        if "num_layers" in overrides:  # the preset's layer-type pattern, cut or repeated to the new depth
            pattern = get_preset(model.preset).layer_types
            overrides["layer_types"] = tuple(pattern[i % len(pattern)] for i in range(overrides["num_layers"]))
        return get_preset(model.preset, **overrides)
    if overrides:
        raise ConfigError(f"model.init_from fixes the architecture; drop the overrides {sorted(overrides)}")
    path = user_path(model.init_from)
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"model.init_from={path} is not a Hugging Face checkpoint directory (no config.json there); "
            "point it to a directory with config.json and *.safetensors, or leave it empty for a random init"
        )
    if model.get("towers"):
        d = read_config_dict(path)
        kind = described_type(d)
        if kind is TEXT_TYPE:
            raise ConfigError(
                f"model.towers=true but {path} describes no vision or audio tower; give a Qwen3-VL / Qwen3-ASR "
                "checkpoint, or drop model.towers to train the text model"
            )
        return kind.read(d)
    return read_config(path)


def tower_patterns(model: Any, runtime: Runtime) -> tuple[str, ...]:
    """`optim.frozen` regexes for every tower of a model (the parameters beside its `text` stack)."""
    _, state = model_type_of(model).abstract(model, runtime)
    return tuple(f"{name}/.*" for name in state if name != "text")


def init_params(model: ConfigDict, runtime: Runtime, mesh, objective: Objective) -> nnx.State:
    """fp32 master weights from `init_from`, read tensor by tensor straight into their shardings (and
    completed by the objective, e.g. with a fresh task head)."""
    towers = bool(model.get("towers"))  # else the text stack alone trains
    loaded = from_pretrained(model.init_from, runtime=runtime, mesh=mesh, text_only=not towers)
    params = nnx.state(loaded, nnx.Param)
    return objective.init_params(params) if objective.init_params is not None else params


def tower_factory(model: Any, runtime: Runtime) -> Callable[[nnx.Rngs], nnx.Module]:
    """Builds the whole model (text stack and towers) of a tower config, as `StateLayout` initialises it."""
    model_class = model_type_of(model).model_class
    return lambda rngs: model_class(model, runtime, rngs=rngs)
