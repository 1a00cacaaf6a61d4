"""Errors a user can act on. The CLI prints their message (no traceback) and exits 2;
anything else is treated as a bug (exit 1, traceback with --debug)."""


class CitylakeError(Exception):
    """Bad input, configuration or state; the message says what to fix."""
