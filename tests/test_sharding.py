"""Meshes, logical axis rules (and what replication costs) and a forward pass on 8 fake CPU devices."""

import logging

import jax
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import bidirlm_jax
from bidirlm_jax import sharding
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.checkpoint import load_checkpoint, save_checkpoint
from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.testing import reference
from bidirlm_jax.train import loop
from bidirlm_jax.train.config import base_config, validate
from bidirlm_jax.train.optim import make_optimizer
from bidirlm_jax.train.state import StateLayout


@pytest.fixture(scope="module")
def untied_gemma_dir(tmp_path_factory):
    """Untied, so the LM head's (vocab, embed) sharding is exercised too."""
    config = reference.gemma3_config(tie_word_embeddings=False)
    return reference.save(reference.build(config), tmp_path_factory.mktemp("g") / "hf")


def test_make_mesh_sizes(monkeypatch):
    calls = []
    make = jax.make_mesh
    monkeypatch.setattr(jax, "make_mesh", lambda *a, **k: calls.append((a, k)) or make(*a, **k))
    mesh = sharding.make_mesh(2, -1, 2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 3  # the logical rules and sharding hints need auto axes
    assert calls[0][0][0] == [2, 2, 2]  # topology-aware device order (TPU torus, GPU ids)
    chosen = jax.devices()[4:]
    mesh = sharding.make_mesh(-1, devices=chosen)
    assert mesh.devices.flatten().tolist() == chosen and calls[1][1]["devices"] == chosen
    for args, message in [
        ((3, 1, 1), "mesh data=3 fsdp=1 tensor=1 does not divide the 8 available devices"),
        ((-1, -1, 2), "at most one mesh axis may be -1"),
        ((2, 2, 1), "uses 4 devices but 8 are available; set one axis to -1"),
    ]:
        with pytest.raises(ConfigError, match=message):
            sharding.make_mesh(*args)


class _SliceDevice:
    """A CPU device posing as one chip of a multi-slice TPU job."""

    def __init__(self, device, slice_index):
        self.device, self.slice_index = device, slice_index


def test_on_several_tpu_slices_data_is_split_over_the_slices(monkeypatch):
    calls = []

    def hybrid(mesh_shape, dcn_mesh_shape, devices):
        calls.append((mesh_shape, dcn_mesh_shape))
        return np.asarray([d.device for d in devices]).reshape(np.multiply(mesh_shape, dcn_mesh_shape))

    monkeypatch.setattr(sharding.mesh_utils, "create_hybrid_device_mesh", hybrid)
    devices = [_SliceDevice(d, i // 4) for i, d in enumerate(jax.devices())]
    mesh = sharding.make_mesh(-1, 2, 2, devices=devices)
    assert calls == [((1, 2, 2), (2, 1, 1))] and dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ConfigError, match="mesh data=1 does not split over the 2 TPU slices"):
        sharding.make_mesh(1, -1, 1, devices=devices)


def test_rules_skip_axes_that_do_not_divide():
    mesh = sharding.make_mesh(2, 2, 2)
    assert sharding.logical_to_spec(("embed", "heads", "head_dim"), (64, 4, 32), mesh) == P("fsdp", "tensor", None)
    assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 1, 32), mesh) == P("fsdp", None, None)
    assert sharding.logical_to_spec(("batch", "seq"), (8, 16), mesh) == P(("data", "fsdp"), None)


def test_a_run_changes_the_rules_and_with_them_a_parameters_sharding():
    tx, _ = make_optimizer(base_config().optim, total_steps=10)
    mesh = sharding.make_mesh(2, 2, 2)

    def q_proj_spec():  # [heads, head_dim, embed]
        return (
            StateLayout(get_preset("tiny-qwen3"), tx, mesh, seed=0)
            .shardings.params["layers"][0]["attn"]["q_proj"]
            .get_value()
            .spec
        )

    assert q_proj_spec() == P("tensor", None, "fsdp")
    with sharding.use_rules({"heads": (), "embed": ("tensor", "fsdp")}) as rules:
        assert rules["mlp"] == ("tensor",)  # the other rules stay
        assert q_proj_spec() == P(None, None, ("tensor", "fsdp"))
        assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"), None)
        with sharding.use_rules({"batch": ("data",), "seq": ("fsdp",)}):  # sequence parallelism
            assert sharding.batch_sharding(mesh).spec == P(("data",), None)
            assert sharding.logical_to_spec(("batch", "seq"), (8, 16), mesh) == P("data", "fsdp")
    assert q_proj_spec() == P("tensor", None, "fsdp")  # back to the defaults


@pytest.mark.parametrize("axes", [("model",), ("tensor", "tensor")])
def test_rules_naming_unknown_or_repeated_mesh_axes_are_refused(axes):
    with pytest.raises(ConfigError, match=r"mesh.rules.seq=.*among \('data', 'fsdp', 'tensor'\)"):
        sharding.make_rules({"seq": axes})
    config = base_config()
    config.mesh.rules.seq = axes
    with pytest.raises(ConfigError, match="fix --config.mesh.rules.seq"):
        validate(config)


def test_train_runs_under_its_configs_rules(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(loop, "_train", lambda *a, **k: seen.append(dict(sharding.current_rules())))
    config = base_config()
    config.mesh.rules.seq = ("tensor",)
    loop.train(config, str(tmp_path))
    assert seen == [{**sharding.LOGICAL_RULES, "seq": ("tensor",)}]
    assert sharding.current_rules() is sharding.LOGICAL_RULES


def test_replication_where_an_axis_does_not_divide_is_logged_once_per_kind_with_its_cost(caplog):
    tx, _ = make_optimizer(base_config().optim, total_steps=10)
    with caplog.at_level(logging.WARNING, logger="bidirlm_jax"):
        StateLayout(get_preset("tiny-qwen3"), tx, sharding.make_mesh(1, 2, 4), seed=0)  # 2 KV heads, tensor=4
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("bidirlm_jax")]
    assert len(messages) == 2, messages  # k_proj and v_proj; q_proj (4 heads) splits
    # [2 kv heads, 32, 64 embed / fsdp 2] fp32 = 8 KiB per device, of which 3/4 would go with a split;
    # 2 layers × (parameter, Adam mu, Adam nu) = 6 arrays.
    for message, kind in zip(messages, ("k_proj", "v_proj")):
        assert message.startswith(f"{kind}: cannot split kv_heads=2 over tensor=4"), message
        assert "36.0 KiB more per device over its 6 arrays" in message, message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bidirlm_jax"):
        StateLayout(get_preset("tiny-qwen3"), tx, sharding.make_mesh(2, 2, 2), seed=0)
    assert not [r for r in caplog.records if r.name.startswith("bidirlm_jax")]


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2), (8, 1, 1)])
def test_sharded_forward_equals_single_device(shape, untied_gemma_dir, tmp_path):
    ids, mask = reference.batch(batch=8)
    expected = np.asarray(
        reference.logits(bidirlm_jax.from_pretrained(untied_gemma_dir, attention="bidirectional"), ids, mask)
    )
    mesh = sharding.make_mesh(*shape)
    model = bidirlm_jax.from_pretrained(untied_gemma_dir, attention="bidirectional", mesh=mesh)
    q_proj = model.layers[0].attn.q_proj[...]
    assert q_proj.sharding.spec == sharding.logical_to_spec(("heads", "head_dim", "embed"), q_proj.shape, mesh)
    with jax.set_mesh(mesh):
        batch = jax.device_put((ids, mask), sharding.batch_sharding(mesh))
        logits = reference.logits(model, *batch)
    # Sharded matmuls sum their 64-wide contractions in other groups: ~fp32_tol(64) = 7.6e-6 per layer's values
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)


def test_checkpoint_restores_into_a_mesh(untied_gemma_dir, tmp_path):
    model = bidirlm_jax.from_pretrained(untied_gemma_dir)
    save_checkpoint(model, tmp_path / "ckpt")
    mesh = sharding.make_mesh(2, 2, 2)
    restored = load_checkpoint(tmp_path / "ckpt", mesh=mesh)
    head = restored.lm_head[...]
    assert head.sharding.spec == P("tensor", "fsdp")
    np.testing.assert_array_equal(np.asarray(head), np.asarray(model.lm_head[...]))
