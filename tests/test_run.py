"""io.run owns a training run's directory: what the engine and the checkpointer write is where every reader looks."""

from types import SimpleNamespace

import jax
import optax

from bidirlm_jax.io import run
from bidirlm_jax.io.tokenizer import train_tokenizer
from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.sharding import make_mesh
from bidirlm_jax.train.checkpoints import Checkpointer
from bidirlm_jax.train.loop import _write_model_description
from bidirlm_jax.train.state import StateLayout


def test_the_tokenizer_a_run_saves_is_the_one_it_resumes_with(tmp_path):
    """`objectives.base.run_tokenizer` reads `run.saved_tokenizer`; the engine writes `model/` — one place."""
    workdir = tmp_path / "run"
    assert run.saved_tokenizer(workdir) is None
    tokenizer = train_tokenizer(["a few words to learn from"] * 8, 300)
    plan = SimpleNamespace(
        model=get_preset("tiny-qwen3"), objective=SimpleNamespace(tokenizer=tokenizer, run_files={"extra.json": "{}"})
    )
    _write_model_description(workdir, plan)
    assert run.saved_tokenizer(workdir) == run.model_dir(workdir)
    assert (run.model_dir(workdir) / "extra.json").is_file()
    assert run.description_dir(tmp_path / "not-a-run") == tmp_path / "not-a-run"


def test_the_checkpointer_writes_the_step_layout_readers_use(tmp_path):
    config = get_preset("tiny-qwen3")
    layout = StateLayout(config, optax.sgd(1.0), make_mesh(1, 1, 1, devices=jax.devices()[:1]), seed=0)
    ckpt = Checkpointer(run.checkpoints_dir(tmp_path), save_every=1, keep=1)
    assert ckpt.save(3, layout.init(), {"note": "meta"})
    ckpt.wait()
    ckpt.close()
    assert run.state_dir(tmp_path, 3).is_dir() and run.meta_dir(tmp_path, 3).is_dir()
    assert run.step_dir(tmp_path, 3).parent == run.checkpoints_dir(tmp_path)
