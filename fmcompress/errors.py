"""Errors that the CLI turns into a one-line message and a documented exit code.

Exit codes (documented in the README):
    0  success
    1  a broken ceiling or a failed verification (the CI gate)
    2  usage and input errors (bad flags, unreadable model, bad data, infeasible plan)
  130  interrupted (Ctrl-C)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class FmcError(Exception):
    """Base class: carries the exit code the CLI should return."""

    exit_code = EXIT_USAGE


class InputError(FmcError):
    """The user's input (model, flags, data) cannot be used. Exit 2."""

    exit_code = EXIT_USAGE


class UnsupportedOpError(InputError):
    """The model uses operators this component cannot handle. Exit 2."""


class CeilingError(FmcError):
    """A stored feature map is above the ceiling. Exit 1."""

    exit_code = EXIT_GATE


class VerificationError(FmcError):
    """An emitted model failed verification. Exit 1."""

    exit_code = EXIT_GATE


class Interrupted(FmcError):
    """Ctrl-C with something to say (e.g. how to resume training). Exit 130."""

    exit_code = EXIT_INTERRUPTED

