"""The project's user-facing exceptions.

Every failure a user can cause (bad path, bad config, corrupt file, existing output) raises a
`BidirLMError` whose message says what was wrong and what to do; the CLI prints it without a
traceback and exits non-zero.
"""


class BidirLMError(Exception):
    """A user-facing failure with an actionable message."""


class ConfigError(BidirLMError):
    """A model or run configuration that cannot be used."""


class CheckpointError(BidirLMError):
    """A checkpoint directory or file that cannot be read or written as asked."""


class Preempted(Exception):
    """A training run stopped at a checkpoint on SIGTERM (a preemption notice) before it finished.

    Not a failure: what was to be built from the run (a variant, an ablation cell) was not recorded, so running
    the same command again resumes the run from its checkpoint — or starts it over when the run lay in a
    temporary output directory that was removed (`kept=False`). The CLI exits as `bidirlm train` does then (0).
    """

    def __init__(self, workdir: object, step: int, *, kept: bool = True):
        self.workdir, self.step, self.kept = workdir, step, kept
        if kept:
            message = f"checkpoint saved in {workdir} — run the same command again to resume"
        else:
            message = f"the run in {workdir} was temporary and is removed — run the same command again to start over"
        super().__init__(f"stopped by SIGTERM after step {step}; nothing was recorded: {message}")
