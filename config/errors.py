"""The typed error of a user mistake, and how any error reads in one line.

Library code raises; only the command layer (commands/main.py) prints the line and picks the exit code.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A user mistake (configuration, data, launch): printed as one line, exit code 2, no traceback."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none (for one-line errors)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
