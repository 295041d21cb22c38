"""Errors a user can act on: the CLI prints their message, never a traceback."""


class DeepTraceError(Exception):
    """A failure with a message that tells the user what to do."""
