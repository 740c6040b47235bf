"""Typed errors. Every user-facing failure is a ``QtoolError`` whose message names the
problem and the fix in one line; the CLI maps it to an exit code and prints it without a
traceback (unless ``--debug``)."""


class QtoolError(Exception):
    """A known failure the user can fix. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class UserInputError(QtoolError):
    """Bad model path, calibration file, option value or combination."""


class UnsupportedError(QtoolError):
    """A valid request qtool cannot do (architecture, shape, format constraint)."""


class NumericsError(QtoolError):
    """NaN/inf in weights or activations, or a factorization that cannot be rescued."""


class FormatError(QtoolError):
    """A checkpoint on disk does not match the layout its config claims."""
