"""Errors a person can act on, each mapped to the CLI's exit code.

Usage and config mistakes exit with 2, failures while doing the work exit with 1. The message is
one line that names the key, file or record and says what to do, so the CLI prints it without a
traceback.
"""


class LmforgeError(Exception):
    """Base of every error lmforge expects to report to a person."""

    exit_code = 1


class ConfigError(LmforgeError):
    """A config key, value or recipe is wrong; nothing has run yet."""

    exit_code = 2


class InputError(LmforgeError):
    """An input path, artifact or source is missing, incomplete or incompatible."""

    exit_code = 2


class StageError(LmforgeError):
    """A stage failed while doing its work (e.g. the loss diverged)."""

    exit_code = 1
