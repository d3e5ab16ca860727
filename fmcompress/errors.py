"""Errors that the CLI turns into a one-line message and a documented exit code.

Exit codes (documented in the README):
    0  success
    1  a broken ceiling or a failed verification (the CI gate): CeilingError, VerificationError
    2  usage and input errors (bad flags, unreadable model, bad data, infeasible plan): InputError
       and click's own usage errors; also an OS failure or running out of memory
    3  an internal error: any other exception escaping a command is a bug in fmcompress, not
       a problem with the input (InternalError, or whatever the code raised)
  130  interrupted (Ctrl-C)

Each is one line on stderr; `fmcompress --debug ...` or FMCOMPRESS_DEBUG=1 prints the
traceback first, with its chained causes (raise X from exc keeps them).
"""

from __future__ import annotations

import functools

EXIT_OK = 0
EXIT_GATE = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
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


class InternalError(FmcError):
    """A bug in fmcompress, with where it happened; raise it `from` the original exception,
    whose type the CLI reports. Exit 3."""

    exit_code = EXIT_INTERNAL


class Interrupted(FmcError):
    """Ctrl-C with something to say (e.g. how to resume training). Exit 130."""

    exit_code = EXIT_INTERRUPTED


# onnxruntime's own exception types (its pybind module; no common base class besides Exception)
_ORT_ERROR_NAMES = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
                    "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")


@functools.cache
def onnxruntime_errors() -> tuple[type[Exception], ...]:
    """What onnxruntime raises for a model or a feed it cannot take: its own types, and the
    RuntimeError and ValueError of its Python layer (bad feeds, providers).
    For `except onnxruntime_errors():`; imports onnxruntime only when an exception is matched."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    own = tuple(getattr(state, name) for name in _ORT_ERROR_NAMES if hasattr(state, name))
    return (*own, RuntimeError, ValueError)
