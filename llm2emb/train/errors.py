"""Errors that stop a training run with a one-line message (the CLI prints `UserError`s without a traceback)."""

from llm2emb.errors import UserError


class TrainingStopped(UserError):
    """A run stopped by one of its guards before an optimizer step; the runner adds which stage it was."""


class NonFiniteLossError(TrainingStopped):
    """The loss became NaN or infinite; raised before any gradient is written, so no optimizer step runs and the
    last good checkpoint stays the newest one on disk."""
