"""How the command line fails: one line on stderr and a documented exit code (fmcompress.errors).

Known errors (FmcError, click's usage errors, an OS failure, running out of memory) are
`error: ...` with their code; anything else escaping a command is a bug in fmcompress:
`internal error: <type>: <message> (...)`, exit 3. `fmcompress --debug ...` or
FMCOMPRESS_DEBUG=1 prints the traceback (with its chained causes) before that line.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

import click

from ..errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, FmcError, InternalError

DEBUG_KEY = "fmcompress.debug"  # in click's context meta, set by the group's --debug flag
DEBUG_ENV = "FMCOMPRESS_DEBUG"


def one_line(message: object) -> str:
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"error: {one_line(message)}", err=True)
    sys.exit(code)


def warn(messages: Any) -> None:
    """Every warning as `warning: ...` on stderr (also with -q)."""
    for message in messages or []:
        click.echo(f"warning: {one_line(message)}", err=True)


def debugging() -> bool:
    """--debug on the group, or FMCOMPRESS_DEBUG=1 in the environment."""
    if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
        return True
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get(DEBUG_KEY))


def _print_traceback(exc: BaseException) -> None:
    click.echo("".join(traceback.format_exception(exc)).rstrip("\n"), err=True)


def internal_error_line(exc: BaseException) -> str:
    """`internal error: TypeError: ... (a bug in fmcompress; ...)`; an InternalError names the
    type of the exception it was raised from."""
    cause = exc.__cause__ if isinstance(exc, InternalError) and exc.__cause__ is not None else exc
    return (f"internal error: {type(cause).__name__}: {one_line(exc) or '(no message)'} "
            "(a bug in fmcompress; run with --debug for the traceback)")


def fail_internal(exc: BaseException, debug: bool) -> NoReturn:
    if debug:
        _print_traceback(exc)
    click.echo(internal_error_line(exc), err=True)
    sys.exit(EXIT_INTERNAL)


def _out_of_memory(exc: BaseException) -> bool:
    """MemoryError, or torch's (imported only where it is already loaded)."""
    torch = sys.modules.get("torch")
    torch_oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return isinstance(exc, MemoryError) or (torch_oom is not None and isinstance(exc, torch_oom))


def _fail_known(exc: Exception, debug: bool) -> NoReturn:
    """An error fmcompress expects: its own, an OS failure, no memory left; else an internal one."""
    if isinstance(exc, InternalError):
        fail_internal(exc, debug)
    if debug:
        _print_traceback(exc)
    if isinstance(exc, FmcError):
        fail(str(exc), exc.exit_code)
    if _out_of_memory(exc):
        fail("out of memory", EXIT_USAGE)
    if isinstance(exc, OSError):  # an OS failure (disk full, no permission) is one line, not a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        fail(f"{where}{exc.strerror or exc}", EXIT_USAGE)
    fail_internal(exc, debug=False)  # the traceback, if asked for, is printed above


def handle_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command: FmcError -> its line and code, Ctrl-C -> 130, a bug -> exit 3."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            fail("interrupted; nothing was written", EXIT_INTERRUPTED)
        except (click.ClickException, click.Abort, click.exceptions.Exit):
            raise  # click's own signals, raised by the command itself: the group words them
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                raise  # stdout closed early (`| head`): the group exits as click does
            _fail_known(exc, debugging())
        except Exception as exc:  # the boundary: whatever escapes a command ends here, as one line
            _fail_known(exc, debugging())

    return wrapper


def _click_message(exc: click.ClickException) -> str:
    """click's message on one line, lower-case like ours, with where to find help."""
    message = one_line(exc.format_message()).rstrip(".")
    if message[:1].isupper() and message[1:2].islower():
        message = message[0].lower() + message[1:]
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click.UsageError) and ctx is not None:
        message += f" (see '{ctx.command_path} --help')"
    return message


class OneLineGroup(click.Group):
    """Shows click's own errors (usage, bad values, unknown options or commands) as one
    `error: ...` line with click's exit code (2 for usage errors); --help stays as it is.
    A bug outside any command (in an option's callback, say) is still an internal error."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        argv = sys.argv[1:] if args is None else list(args)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            fail(_click_message(exc), exc.exit_code)
        except click.Abort:
            fail("interrupted; nothing was written", EXIT_INTERRUPTED)
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                fail_internal(exc, debugging() or "--debug" in argv)
            sys.exit(1)  # stdout closed early (`| head`): click's behaviour
        except Exception as exc:  # the last boundary: a bug before or after any command runs
            fail_internal(exc, debugging() or "--debug" in argv)
        sys.exit(code if isinstance(code, int) else 0)  # --help and --version return their exit code
