"""Errors a user can fix, and the exit codes of the command line."""

EXIT_OK = 0
EXIT_GATE = 1  # a validation gate was missed; the complete output was written
EXIT_BAD_INPUT = 2  # LmmcError: one message naming what is wrong and the fix; nothing written
EXIT_INTERNAL = 3  # a bug: the traceback goes to a log file named in the message
EXIT_INTERRUPTED = 130  # SIGINT or SIGTERM; nothing written


class LmmcError(Exception):
    """Bad input or configuration. The message names what is wrong and how to fix it."""


class GateFailed(Exception):
    """A validation gate in the recipe was missed; the outputs exist but must not be trusted."""
