"""The training engine: sharded train state, jitted step, objectives, optimizer, checkpoints, metrics.

`train(config, workdir)` runs a whole job (what `bidirlm train` calls); the pieces are public so that
tests, notebooks and benchmarks can drive a step directly.
"""

from bidirlm_jax.losses.causal_lm import causal_lm_loss
from bidirlm_jax.train.config import base_config, parse_train_args
from bidirlm_jax.train.loop import train
from bidirlm_jax.train.objectives import OBJECTIVES, GradFn, LossFn, Objective, build_objective, token_sum_grads
from bidirlm_jax.train.optim import make_optimizer, make_schedule
from bidirlm_jax.train.state import StateLayout, TrainState
from bidirlm_jax.train.step import jit_step, make_step_fn

__all__ = [
    "OBJECTIVES",
    "GradFn",
    "LossFn",
    "Objective",
    "StateLayout",
    "TrainState",
    "base_config",
    "build_objective",
    "causal_lm_loss",
    "jit_step",
    "make_optimizer",
    "make_schedule",
    "make_step_fn",
    "parse_train_args",
    "token_sum_grads",
    "train",
]
