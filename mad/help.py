"""How `mad` shows its help, its usage errors and its start-up errors.

Help in the plain layout of most command-line tools (`--port INTEGER`, `mad predict
[OPTIONS] IMAGES...`) rather than typer's own (`--port <int>`, `{images}...`); a usage error
(a bad option value, a missing argument) as one line on stderr, exit status 2; a start-up
error (model/startup.py: a bad path, a checkpoint that does not load) as one line on stderr,
exit status 3.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar, get_args, get_origin

import typer
from typer import _click  # typer bundles its own click: its exceptions and context
from typer._click.exceptions import UsageError
from typer._click.globals import get_current_context
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from model.startup import StartupError

METAVARS = {str: "TEXT", int: "INTEGER", float: "FLOAT", Path: "PATH"}


def metavar(annotation: Any) -> str:
    """The placeholder of an option's value: TEXT, INTEGER, FLOAT, PATH."""
    if get_origin(annotation) is list:
        [annotation] = get_args(annotation)
    return METAVARS.get(annotation, getattr(annotation, "__name__", "VALUE").upper())


def command_name(ctx: _click.Context | None = None) -> str:
    """`mad serve` whatever the program was called (`python -m mad.cli`, a test runner);
    default: the command running now."""
    if ctx is None:
        ctx = get_current_context(silent=True)
    names = []
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(["mad", *reversed(names)])


class PlainHelpCommand(TyperCommand):
    def collect_usage_pieces(self, ctx: _click.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = (param.metavar or param.name or "").upper()
                name += "..." if param.nargs != 1 else ""
                pieces.append(name if param.required else f"[{name}]")
        return pieces

    def format_options(self, ctx: _click.Context, formatter: _click.HelpFormatter) -> None:
        arguments, options = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if isinstance(param, TyperArgument):
                name = (param.metavar or param.name or "").upper()
                arguments.append((name + ("..." if param.nargs != 1 else ""), record[1]))
            elif isinstance(param, TyperOption):
                options.append((self.option_column(param), record[1]))
        if arguments:
            with formatter.section("Arguments"):
                formatter.write_dl(arguments)
        if options:
            with formatter.section("Options"):
                formatter.write_dl(options)

    @staticmethod
    def option_column(option: TyperOption) -> str:
        names = ", ".join(option.opts)
        if option.secondary_opts:
            names += " / " + ", ".join(option.secondary_opts)
        if option.is_flag or option.count:
            return names
        return f"{names} {option.metavar or metavar(option.type_descriptor.annotation)}"


class OneLineUsageError(UsageError):
    def show(self, file: IO[Any] | None = None) -> None:
        name = command_name(self.ctx)
        print(f"{name}: {self.format_message()} (see {name} --help)", file=file or sys.stderr)


class PlainHelpGroup(TyperGroup):
    """Commands with PlainHelpCommand's help, and usage errors as OneLineUsageError."""

    def make_context(self, *args: Any, **kwargs: Any) -> _click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except UsageError as exc:
            raise one_line(exc) from None

    def invoke(self, ctx: _click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OneLineUsageError:
            raise
        except UsageError as exc:
            raise one_line(exc) from None


def one_line(exc: UsageError) -> OneLineUsageError:
    error = OneLineUsageError(exc.format_message(), exc.ctx)
    error.exit_code = exc.exit_code
    return error


def new_app(**options: Any) -> typer.Typer:
    """A typer app whose commands get the plain help and one-line usage errors."""
    return typer.Typer(
        cls=PlainHelpGroup,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,  # help texts are plain: "[env MAD_X]" must not read as markup
        **options,
    )


Command = TypeVar("Command", bound=Callable[..., Any])


def debugging() -> bool:
    """--debug or MAD_DEBUG: show start-up errors' tracebacks too."""
    return os.environ.get("MAD_DEBUG", "").lower() in ("1", "true", "yes")


def one_line_errors(command: Command) -> Command:
    """A StartupError (model/startup.py) from `command`: its message as one line on stderr
    and exit status 3; with --debug (MAD_DEBUG=1), the traceback as well."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except StartupError as exc:
            if debugging():
                raise
            print(f"{command_name()}: {exc}", file=sys.stderr)
            raise typer.Exit(3) from None

    return run  # type: ignore[return-value]
