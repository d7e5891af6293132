"""Logical axis rules and a forward pass on 8 fake CPU devices (data × fsdp × tensor)."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import bidirlm_jax
from bidirlm_jax import sharding
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.checkpoint import load_checkpoint, save_checkpoint
from bidirlm_jax.testing import reference


@nnx.jit
def forward(model, ids, mask):
    return model(ids, mask).logits


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    config = reference.gemma3_config(tie_word_embeddings=False)
    return reference.save(reference.build(config), tmp_path_factory.mktemp("g") / "hf")


def test_make_mesh_sizes():
    assert dict(sharding.make_mesh(2, -1, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ConfigError, match="does not divide"):
        sharding.make_mesh(3, 1, 1)
    with pytest.raises(ConfigError, match="at most one"):
        sharding.make_mesh(-1, -1, 2)


def test_rules_skip_axes_that_do_not_divide():
    mesh = sharding.make_mesh(2, 2, 2)
    assert sharding.logical_to_spec(("embed", "heads", "head_dim"), (64, 4, 32), mesh) == P("fsdp", "tensor", None)
    assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 1, 32), mesh) == P("fsdp", None, None)
    assert sharding.logical_to_spec(("batch", "seq"), (8, 16), mesh) == P(("data", "fsdp"), None)


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2), (8, 1, 1)])
def test_sharded_forward_equals_single_device(shape, gemma_dir, tmp_path):
    ids, mask = reference.batch(batch=8)
    expected = np.asarray(forward(bidirlm_jax.from_pretrained(gemma_dir, attention="bidirectional"), ids, mask))
    mesh = sharding.make_mesh(*shape)
    model = bidirlm_jax.from_pretrained(gemma_dir, attention="bidirectional", mesh=mesh)
    q_proj = model.layers[0].attn.q_proj[...]
    assert q_proj.sharding.spec == sharding.logical_to_spec(("heads", "head_dim", "embed"), q_proj.shape, mesh)
    with jax.set_mesh(mesh):
        batch = jax.device_put((ids, mask), sharding.batch_sharding(mesh))
        logits = forward(model, *batch)
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)


def test_checkpoint_restores_into_a_mesh(gemma_dir, tmp_path):
    model = bidirlm_jax.from_pretrained(gemma_dir)
    save_checkpoint(model, tmp_path / "ckpt")
    mesh = sharding.make_mesh(2, 2, 2)
    restored = load_checkpoint(tmp_path / "ckpt", mesh=mesh)
    head = restored.lm_head[...]
    assert head.sharding.spec == P("tensor", "fsdp")
    np.testing.assert_array_equal(np.asarray(head), np.asarray(model.lm_head[...]))
