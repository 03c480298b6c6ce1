"""Errors meant for users: each one is a clear sentence that names what is at fault and what to do.

The CLI catches :class:`TrainvalError` and prints its message as one line (exit code 2 for config and
usage errors, 1 for the rest); anything else is an internal bug and keeps its traceback.
"""

from __future__ import annotations


class TrainvalError(Exception):
    """Base class of every error caused by the user's input, files or environment."""

    exit_code = 1


class ConfigError(TrainvalError):
    """A config file, key, value or command-line override is wrong."""

    exit_code = 2


class DataError(TrainvalError):
    """The data cannot be trained on as given (empty, bad labels, NaN features, shape mismatch)."""


class CheckpointError(TrainvalError):
    """A checkpoint cannot be written, read, trusted or loaded into the model."""


class NonFiniteLossError(TrainvalError):
    """The training loss, or the weights after an optimizer step, became NaN or infinite."""


class RunFolderError(TrainvalError):
    """The run folder already holds a finished run, or is otherwise unusable."""

    exit_code = 2


class Interrupted(TrainvalError):
    """Training was stopped by SIGINT/SIGTERM after saving ``last.pt``."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
