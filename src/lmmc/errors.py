"""Errors a user can fix: the CLI prints their message and exits with code 2."""


class LmmcError(Exception):
    """Bad input or configuration. The message names what is wrong and how to fix it."""


class GateFailed(Exception):
    """A validation gate in the recipe was missed; the outputs exist but must not be trusted."""
