"""Errors that are the user's to fix, not bugs: the CLI prints their message on one line (no
traceback) and exits with `EXIT_USER_ERROR`, leaving nothing behind that blocks the same command."""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with what the user gave — config, data, model paths, label files, the run folder.
    The message names it (the config key, or the file and line) and, where it helps, what to do."""
