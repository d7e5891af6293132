"""Every preset of every packaged config builds its abstract train state on the 8-device mesh it asks for:
the model (with its task head for fine-tuning), AdamW's moments and valid shardings, with nothing
allocated (`jax.eval_shape`)."""

import importlib
import math

import jax
import pytest
from jax.sharding import NamedSharding
from ml_collections import ConfigDict

from bidirlm_jax import configs, sharding
from bidirlm_jax.io.model_types import model_type_of
from bidirlm_jax.models.heads import HeadConfig, model_factory
from bidirlm_jax.train import trainable
from bidirlm_jax.train.loop import model_config
from bidirlm_jax.train.objectives.finetune import OBJECTIVES as FINETUNE_OBJECTIVES
from bidirlm_jax.train.optim import make_optimizer
from bidirlm_jax.train.state import StateLayout

DEVICES = 8
CASES = [
    (name, preset)
    for name in configs.names()
    for preset in importlib.import_module(f"bidirlm_jax.configs.{name}").PRESETS
]


def _train_configs(config: ConfigDict) -> dict[str, ConfigDict]:
    """The train configs a config file holds: itself, or (the ablation harness) one per trained stage."""
    if "objective" in config:
        return {"": config}
    return {k: v for k, v in config.items() if isinstance(v, ConfigDict) and "objective" in v}


def _factory(config: ConfigDict, model):
    """The trained module: the Transformer, or for fine-tuning the encoder (with its towers, if any) with the
    preset's head."""
    if config.objective not in FINETUNE_OBJECTIVES:
        return None
    labels = config.finetune.num_labels or (1 if config.objective == "regression" else 2)
    head = HeadConfig(
        config.objective, labels, pooling="mean", classifier=config.finetune.classifier.replace("auto", "")
    )
    return model_factory(model, head, encoder=model_type_of(model).model_class)  # towers: image/audio presets


def test_every_config_file_is_covered():
    assert {name for name, _ in CASES} >= {"lm", "mntp", "contrastive", "finetune", "ablation"}
    assert len(CASES) >= 20


@pytest.mark.parametrize("name, preset", CASES)
def test_preset_builds_its_abstract_state_on_the_mesh(name, preset):
    stages = _train_configs(importlib.import_module(f"bidirlm_jax.configs.{name}").get_config(preset))
    assert stages, f"{name}:{preset} holds no train config"
    for stage, config in stages.items():
        where = f"{name}:{preset}{' ' + stage if stage else ''}"
        mesh_sizes = sharding.mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, DEVICES)
        mesh = sharding.make_mesh(**mesh_sizes)
        model = model_config(config.model)
        tx, _ = make_optimizer(config.optim, config.train.steps)
        with sharding.use_rules(config.mesh.rules):
            layout = StateLayout(
                model,
                tx,
                mesh,
                seed=config.train.seed,
                model_factory=_factory(config, model),
                trainable=trainable.from_config(config.optim),
            )
        leaves = jax.tree.leaves(layout.abstract)
        assert len(jax.tree.leaves(layout.abstract.opt_state)) > 2 * len(jax.tree.leaves(layout.abstract.params))
        per_device = total = 0
        for leaf in leaves:
            assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh.shape == mesh.shape, where
            assert len(leaf.sharding.spec) <= len(leaf.shape), (where, leaf)
            shard = leaf.sharding.shard_shape(leaf.shape)  # raises where a mesh axis does not divide its dim
            per_device += math.prod(shard) * leaf.dtype.itemsize
            total += math.prod(leaf.shape) * leaf.dtype.itemsize
        if mesh_sizes["fsdp"] * mesh_sizes["tensor"] > 1:  # the state is split, not copied, over model axes
            assert per_device < total / 2, (where, per_device, total)
        else:
            assert per_device == total, where
