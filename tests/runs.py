"""Training-run directories as tests read, write and interrupt them: logged metrics, checkpointed params,
saved steps, a fine-tuning run as the loop leaves it, and a preemption notice at a chosen step."""

import json
import os
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from bidirlm_jax.data.labeled import LabelMap
from bidirlm_jax.io.heads import describe
from bidirlm_jax.io.hf_config import config_to_hf
from bidirlm_jax.io.run import HEAD_FILE
from bidirlm_jax.models.heads import EncoderWithHead
from bidirlm_jax.train import metrics as train_metrics
from bidirlm_jax.train.checkpoints import Checkpointer
from bidirlm_jax.train.config import base_config
from bidirlm_jax.train.optim import make_optimizer
from bidirlm_jax.train.state import TrainState, param_shapes


def metrics_of(workdir) -> list[dict]:
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def checkpoint_tree(workdir, step) -> dict:
    """The checkpoint's parameter tree on one local device, whatever topology wrote them."""
    path = Path(workdir).absolute() / "checkpoints" / str(step) / "state"
    checkpointer = ocp.StandardCheckpointer()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        checkpointer.metadata(path).item_metadata.tree,
    )
    return checkpointer.restore(path, target)["params"]


def checkpoint_params(workdir, step) -> list[np.ndarray]:
    """The checkpoint's parameters as numpy arrays, in tree order."""
    return [np.asarray(x) for x in jax.tree.leaves(checkpoint_tree(workdir, step))]


def saved_steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def write_finetune_run(run, model: EncoderWithHead, tokenizer, labels):
    """A fine-tuning run as the loop leaves it: model/{config.json, tokenizer, head.json}, an orbax step."""
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text(json.dumps(config_to_hf(model.config, model.runtime)))
    tokenizer.save_pretrained(run / "model")
    description = describe(model.head_config, LabelMap(model.head_config.task, tuple(labels)), max_length=32)
    (run / "model" / HEAD_FILE).write_text(json.dumps(description))
    tx, _ = make_optimizer(base_config().optim, 10)
    params = nnx.state(model, nnx.Param)
    state = TrainState(jnp.asarray(3, jnp.int32), params, tx.init(params), jax.random.PRNGKey(0))
    checkpointer = Checkpointer(run / "checkpoints", save_every=1, keep=2)
    checkpointer.save(3, state, {"param_shapes": param_shapes(params)}, force=True)
    checkpointer.wait()
    checkpointer.close()


def sigterm_at(monkeypatch, step, run=None):
    """Send this process a real SIGTERM (a preemption notice) while a training run (the one in `run`, or any)
    logs `step`: the loop's own handler takes it, as it would from a scheduler (the run must log that step)."""
    write = train_metrics.MetricsWriter.write

    def write_then_term(self, at, values):
        write(self, at, values)
        if at == step and (run is None or self.path.parent == run):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train_metrics.MetricsWriter, "write", write_then_term)
