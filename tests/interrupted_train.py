"""`bidirlm train`, interrupted on purpose (a test helper run as a subprocess; argv as for `bidirlm`).

TERM_AT=N: the process sends itself SIGTERM while logging step N (a preemption notice mid-run).
KILL_SAVE_AT=N: SIGKILL in the middle of the asynchronous save of step N: orbax has written the arrays
to its temporary directory, but has not committed the checkpoint.
"""

import os
import signal
import sys

import orbax.checkpoint as ocp

from bidirlm_jax import cli
from bidirlm_jax.train import checkpoints, metrics

TERM_AT = int(os.environ.get("TERM_AT", 0))
KILL_SAVE_AT = int(os.environ.get("KILL_SAVE_AT", 0))
_saving = {"step": None}

write = metrics.MetricsWriter.write


def write_then_term(self, step, values):
    write(self, step, values)
    if step == TERM_AT:
        os.kill(os.getpid(), signal.SIGTERM)


save = checkpoints.Checkpointer.save


def save_noting_the_step(self, step, *args, **kwargs):
    _saving["step"] = step
    return save(self, step, *args, **kwargs)


class _DieBeforeCommit:
    """A commit future orbax's background thread waits on: once the arrays are written, SIGKILL."""

    def __init__(self, futures):
        self._futures = futures

    def result(self, timeout=None):
        for f in self._futures:
            f.result()
        os.kill(os.getpid(), signal.SIGKILL)


async_save = ocp.StandardCheckpointHandler.async_save


async def async_save_then_die(self, *args, **kwargs):
    futures = list(await async_save(self, *args, **kwargs) or [])
    return [_DieBeforeCommit(futures)] if _saving["step"] == KILL_SAVE_AT else futures


metrics.MetricsWriter.write = write_then_term
checkpoints.Checkpointer.save = save_noting_the_step
ocp.StandardCheckpointHandler.async_save = async_save_then_die
sys.exit(cli.main(sys.argv[1:]))
