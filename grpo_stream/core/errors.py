"""The one base class for errors that are the user's to fix.

A config field, a path, a server response, a corrupt file: anything a user can correct
raises a subclass of `UserError` with a message that names the field or file. The CLI
prints such an error as one line (no traceback) and exits 2; anything else is a bug and
keeps its traceback. This module imports nothing, so every layer may use it.

    raise ConfigError("learner.lr: must be > 0 (got -1)")
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; its message names the field, file or server."""


class ConfigError(UserError, ValueError):
    """A user error in a config file or override; the message names the field."""
