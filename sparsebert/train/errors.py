"""The trainer's refusals: each carries a message for the user; the CLI prints `error: <message>`
and exits with status 2, before any work starts where the check allows it."""


class TrainError(Exception):
    """Base of every refusal with a message for the user."""


class ConfigError(TrainError, ValueError):
    """A config the trainer refuses."""


class StageError(TrainError, RuntimeError):
    """A stage that cannot run as asked: missing data or models, a method that does not fit."""


class RunError(TrainError, RuntimeError):
    """A run dir that cannot be used (different config, corrupted checkpoint)."""
