"""Train checkpoints: round trip (state, data position, meta), resharding on restore, refusals."""

import jax
import numpy as np
import pytest

from bidirlm_jax.data.lm import lm_dataset
from bidirlm_jax.data.synthetic import markov_tokens
from bidirlm_jax.errors import CheckpointError
from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.sharding import make_mesh
from bidirlm_jax.train.checkpoints import Checkpointer, latest_step
from bidirlm_jax.train.config import base_config
from bidirlm_jax.train.optim import make_optimizer
from bidirlm_jax.train.state import StateLayout, param_shapes

CONFIG = get_preset("tiny-qwen3")


def _iterator():
    return iter(lm_dataset(markov_tokens(512, 5000, seed=0), seq_len=16, global_batch=4, seed=0).to_iter_dataset())


def test_round_trip_onto_another_mesh_with_the_data_position(tmp_path):
    tx, _ = make_optimizer(base_config().optim, total_steps=10)
    saved_layout = StateLayout(CONFIG, tx, make_mesh(2, 2, 2), seed=0)
    state = saved_layout.init()
    it = _iterator()
    for _ in range(3):
        next(it)
    shapes = param_shapes(state.params)
    ckpt = Checkpointer(tmp_path, save_every=5, keep=2)
    assert not ckpt.save(3, state, it, {"param_shapes": shapes})  # not on the interval
    assert ckpt.save(3, state, it, {"param_shapes": shapes}, force=True)
    for step in (5, 10):
        assert ckpt.save(step, state, it, {"param_shapes": shapes})
    ckpt.wait()
    expected_batch = next(it)["input_ids"]
    ckpt.close()
    assert latest_step(tmp_path) == 10
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [5, 10]  # keep-last-2

    # Resume on one device: arrays land in the new layout, the iterator at the saved position.
    layout = StateLayout(CONFIG, tx, make_mesh(1, 1, 1, devices=jax.devices()[:1]), seed=1)
    ckpt = Checkpointer(tmp_path, save_every=5, keep=2)
    ckpt.check_compatible(10, param_shapes(layout.abstract.params))
    fresh = _iterator()
    restored = ckpt.restore(10, layout.abstract, fresh)
    ckpt.close()
    np.testing.assert_array_equal(next(fresh)["input_ids"], expected_batch)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert len(a.sharding.device_set) == 1
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoint_of_another_model_is_refused_by_name(tmp_path):
    tx, _ = make_optimizer(base_config().optim, total_steps=10)
    layout = StateLayout(CONFIG, tx, make_mesh(1, 1, 1, devices=jax.devices()[:1]), seed=0)
    ckpt = Checkpointer(tmp_path, save_every=1, keep=1)
    ckpt.save(1, layout.init(), _iterator(), {"param_shapes": param_shapes(layout.abstract.params)})
    ckpt.wait()
    untied = param_shapes(
        StateLayout(
            CONFIG.replace(tie_word_embeddings=False), tx, make_mesh(1, 1, 1, devices=jax.devices()[:1]), seed=0
        ).abstract.params
    )
    with pytest.raises(CheckpointError, match=r"different model .*checkpoint lacks \['lm_head'\]"):
        ckpt.check_compatible(1, untied)
    ckpt.close()
