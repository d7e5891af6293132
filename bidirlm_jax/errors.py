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
