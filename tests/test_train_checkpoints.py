"""Train checkpoints: round trip (state, meta), resharding on restore, refusals by name, the
temporary directories of killed saves, and the best validation step kept beside them."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from bidirlm_jax.errors import CheckpointError, ConfigError
from bidirlm_jax.io.heads import read_best
from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.sharding import make_mesh
from bidirlm_jax.train.checkpoints import BestStep, Checkpointer, is_better, latest_step
from bidirlm_jax.train.config import base_config, data_stream
from bidirlm_jax.train.optim import make_optimizer
from bidirlm_jax.train.state import StateLayout, param_shapes

CONFIG = get_preset("tiny-qwen3")
ONE_DEVICE = dict(devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def tx():
    return make_optimizer(base_config().optim, total_steps=10)[0]


def _meta(layout, **data):
    config = base_config()
    config.data.update(data)
    return {"param_shapes": param_shapes(layout.abstract.params), "data_stream": data_stream(config.data)}


def test_round_trip_onto_another_mesh(tmp_path, tx):
    saved_layout = StateLayout(CONFIG, tx, make_mesh(2, 2, 2), seed=0)
    state = saved_layout.init()
    meta = _meta(saved_layout)
    ckpt = Checkpointer(tmp_path, save_every=5, keep=2)
    assert not ckpt.save(3, state, meta)  # not on the interval
    assert ckpt.save(3, state, meta, force=True)
    for step in (5, 10):
        assert ckpt.save(step, state, meta)
    ckpt.wait()
    ckpt.close()
    assert latest_step(tmp_path) == 10
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [5, 10]  # keep-last-2

    # Resume on one device: arrays land in the new layout.
    layout = StateLayout(CONFIG, tx, make_mesh(1, 1, 1, **ONE_DEVICE), seed=1)
    ckpt = Checkpointer(tmp_path, save_every=5, keep=2)
    ckpt.check_resumable(10, _meta(layout))
    restored = ckpt.restore(10, layout.abstract)
    ckpt.close()
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert len(a.sharding.device_set) == 1
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tx):
    """A one-step checkpoint of the tiny model on one device, and its layout."""
    directory = tmp_path_factory.mktemp("ckpt")
    layout = StateLayout(CONFIG, tx, make_mesh(1, 1, 1, **ONE_DEVICE), seed=0)
    ckpt = Checkpointer(directory, save_every=1, keep=1)
    ckpt.save(1, layout.init(), _meta(layout, path="tokens.npy"))
    ckpt.wait()
    ckpt.close()
    return directory, layout


def test_checkpoint_of_another_model_is_refused_by_name(saved, tx):
    directory, _ = saved
    untied = StateLayout(CONFIG.replace(tie_word_embeddings=False), tx, make_mesh(1, 1, 1, **ONE_DEVICE), seed=0)
    ckpt = Checkpointer(directory, save_every=1, keep=1)
    with pytest.raises(CheckpointError, match=r"different model .*checkpoint lacks \['lm_head'\]"):
        ckpt.check_resumable(1, _meta(untied, path="tokens.npy"), allow_data_change=True)
    ckpt.close()


def test_another_data_stream_is_refused_by_name_unless_allowed(saved, tmp_path, monkeypatch):
    directory, layout = saved
    ckpt = Checkpointer(directory, save_every=1, keep=1)
    ckpt.check_resumable(1, _meta(layout, path="tokens.npy", read_threads=8, prefetch=1))  # speed only: fine
    monkeypatch.chdir(tmp_path)  # a relative data.path now names another file
    changed = _meta(layout, path="tokens.npy", global_batch_size=16, seq_len=128)
    with pytest.raises(ConfigError) as error:
        ckpt.check_resumable(1, changed)
    message = str(error.value)
    for key in ("data.global_batch_size: 8 -> 16", "data.seq_len: 64 -> 128", f"{tmp_path}/tokens.npy"):
        assert key in message, message
    assert "data.seed" not in message and "--config.train.allow_data_change=true" in message
    ckpt.check_resumable(1, changed, allow_data_change=True)
    ckpt.close()


def test_opening_a_directory_removes_saves_a_killed_run_never_committed(saved, tmp_path):
    directory, _ = saved
    (directory / "7.orbax-checkpoint-tmp" / "state.orbax-checkpoint-tmp").mkdir(parents=True)
    (directory / "notes").mkdir()  # not ours: kept
    Checkpointer(directory, save_every=1, keep=1).close()
    assert not ocp.utils.tmp_checkpoints(directory) and (directory / "notes").is_dir()
    assert latest_step(directory) == 1


def test_is_better():
    assert is_better(0.5, None) and is_better(0.6, 0.5) and not is_better(0.5, 0.5)
    assert not is_better(float("nan"), None)


def test_best_step_keeps_only_improvements_and_resumes_from_the_recorded_best(tmp_path):
    params = nnx.State({"w": nnx.Param(np.arange(4, dtype=np.float32))})
    best = BestStep(tmp_path, "accuracy")
    assert best.value is None
    assert best.offer(2, params, {"accuracy": 0.5, "loss": 1.0})
    assert not best.offer(4, params, {"accuracy": 0.4, "loss": 0.9})  # worse: RUN/best/ keeps step 2
    assert not best.offer(5, params, {"accuracy": float("nan"), "loss": 0.9})
    assert read_best(tmp_path) == {"step": 2, "metrics": {"accuracy": 0.5, "loss": 1.0}}
    resumed = BestStep(tmp_path, "accuracy")  # a resumed run competes with the best its earlier part kept
    assert resumed.value == 0.5
    assert not resumed.offer(6, params, {"accuracy": 0.5})
    assert resumed.offer(7, params, {"accuracy": 0.75}) and read_best(tmp_path)["step"] == 7
