"""User-facing errors.

Every bad input (config, layout, data, checkpoint) raises :class:`UserError`
with one line that names what is wrong and how to fix it.  The CLI prints it as
``megallama: error: <message>`` and exits with status 2 before anything is
created or overwritten.
"""

import sys

EXIT_USAGE = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on SIGTERM/SIGUSR1 with a checkpoint saved; run the same command to resume


def say(line: str) -> None:
    """Write one line to stderr in a single ``write``: the ranks of a job share one pipe, and
    ``print`` writes the text and its newline separately, so two ranks' lines could run together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class UserError(Exception):
    """A one-line, actionable error caused by the user's input (exit status 2)."""

    def __init__(self, message: str):
        message = " ".join(str(message).split())  # always one line
        super().__init__(message)


class ConfigError(UserError):
    """Invalid configuration value or combination."""


class DataError(UserError):
    """Missing, empty, mismatched or corrupt data files."""


class CheckpointError(UserError):
    """Missing, truncated, corrupt or mismatched checkpoint."""
