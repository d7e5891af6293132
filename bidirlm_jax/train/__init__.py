"""The training engine: sharded train state, jitted step, objectives, optimizer, checkpoints, metrics.

`train(config, workdir)` runs a whole job (what `bidirlm train` calls); the pieces are public so that
tests, notebooks and benchmarks can drive a step directly.
"""

from bidirlm_jax.train.config import base_config, parse_train_args
from bidirlm_jax.train.loop import train
from bidirlm_jax.train.losses import LOSSES, LossFn, causal_lm_loss, get_loss
from bidirlm_jax.train.optim import make_optimizer, make_schedule
from bidirlm_jax.train.state import StateLayout, TrainState
from bidirlm_jax.train.step import jit_step, make_step_fn

__all__ = [
    "LOSSES",
    "LossFn",
    "StateLayout",
    "TrainState",
    "base_config",
    "causal_lm_loss",
    "get_loss",
    "jit_step",
    "make_optimizer",
    "make_schedule",
    "make_step_fn",
    "parse_train_args",
    "train",
]
