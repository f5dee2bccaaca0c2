"""How the ``neurofuse`` command reports errors: a user error is one line on stderr,
``neurofuse: error: <message>``, and exit code 2, without a traceback; a bug keeps its
traceback.

What counts as a user error (:data:`USER_ERRORS`):

- the command line itself: an unknown command or option, a missing argument, a value of the
  wrong type or out of range (click's ``ClickException``, raised before or while parsing);
- the library's answer to bad input: every public function checks its arguments and raises a
  ``ValueError`` or ``TypeError`` whose message names the fix (unknown method, dataset or
  option; a value out of range; a malformed ``key=value``), and a missing file is a
  ``FileNotFoundError``;
- the user's files and folders: any other ``OSError`` naming a path (a directory where a file
  was expected, no permission to write ``--out``), and a pickle that
  :mod:`neurofuse.data.safe_pickle` refuses to load or cannot read (``UnpicklingError``).

Anything else (``KeyError``, ``AttributeError``, ``RuntimeError``, ...) is a bug and shows its
traceback. A bug that surfaces as one of the exceptions above would lose its traceback, so
``--debug`` (or the environment variable ``NEUROFUSE_DEBUG=1``) re-raises every error with its
full traceback.

The handling lives in :meth:`UserErrorsMixin.main`, the entry point that ``neurofuse`` (the
typer app), ``python -m neurofuse``, ``python -m neurofuse.bench`` and typer's ``CliRunner``
all go through, so no command needs to catch anything itself.
"""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import click
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from neurofuse import cli

PROG = "neurofuse"
DEBUG_ENV = "NEUROFUSE_DEBUG"

USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    FileExistsError,
    pickle.UnpicklingError,  # neurofuse.data.safe_pickle.UnsafePickleError is one
)
"""Exceptions that mean bad input (see the module): one line on stderr and exit code 2."""

_debug = False


def set_debug(value: bool) -> None:
    """Re-raise every error with its traceback for the rest of this command (``--debug``)."""
    global _debug
    _debug = bool(value)


def debug_from_env() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def report(message: str, code: int = 2) -> NoReturn:
    """Print ``neurofuse: error: <message>`` (folded onto one line) on stderr; exit ``code``."""
    text = " ".join(str(message).split())
    cli.err_console.print(
        f"[bold red]{PROG}: error:[/bold red] {escape(text)}", soft_wrap=True, highlight=False
    )
    sys.exit(code)


class UserErrorsMixin:
    """``main`` of a click command that turns user errors into :func:`report` (module doc)."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        run = super().main  # type: ignore[misc]
        if not standalone_mode:  # a caller that handles exceptions itself
            return run(args, prog_name, complete_var, standalone_mode=False, **extra)
        set_debug(debug_from_env())
        try:
            # Not standalone: click returns the exit code of a typer.Exit instead of exiting,
            # and lets every exception through to the handlers below.
            code = run(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as err:  # the help is printed already
            sys.exit(err.exit_code)
        except click.ClickException as err:  # the command line: unknown option, bad value...
            if _debug:
                raise
            report(err.format_message(), 2)
        except click.Abort:
            cli.err_console.print(f"{PROG}: aborted", highlight=False)
            sys.exit(1)
        except USER_ERRORS as err:
            if _debug:
                raise
            report(str(err) or type(err).__name__, 2)
        sys.exit(code if isinstance(code, int) else 0)


# the mixin's main takes click's arguments by name; typer's stubs spell them differently
class NeurofuseGroup(UserErrorsMixin, TyperGroup):  # type: ignore[misc]
    """The ``neurofuse`` command group (``typer.Typer(cls=NeurofuseGroup)``)."""


class NeurofuseCommand(UserErrorsMixin, TyperCommand):  # type: ignore[misc]
    """A single-command app with the same error handling (``python -m neurofuse.bench``)."""
