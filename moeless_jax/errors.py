"""Error types for bad user input. The CLI prints these as one line; anything else is a bug."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input (a file, a shape, a value); the message names the field or file and the fix."""


# ValueError covers ConfigError, ReplicaTableError, ShapeError and InputError (all subclass it);
# FileNotFoundError covers missing input files.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)
