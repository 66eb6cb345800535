"""Errors a user can cause: the CLI prints their message on one line and exits with their code."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (path, file, flag); shown as one line, no traceback."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
