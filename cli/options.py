"""The command line's conventions, in one place: ``--version``, help without type tags on switches,
and usage errors as one line.

Typer's own usage errors are boxed panels of several lines, beside the project's promise that every
error is one line; its help prints ``<bool>`` after every switch, which invites ``--json true`` (then
read as the prompt "true"). :class:`TrimixGroup` is the click group of ``trimix`` and of its
sub-groups: it prints a usage error (unknown option, missing argument, bad value) as one line that
points at ``--help``, exit code 2, and refuses a switch followed by a truth value before the command
runs, so ``--json true`` says what it is instead of generating from "true".
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import typer
from rich.markup import escape
from typer.core import TyperGroup

from .common import err

try:  # recent Typer carries its own copy of click
    from typer._click import Context
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover - older Typer over click itself
    from click import Context
    from click.exceptions import ClickException, UsageError
try:
    from typer.exceptions import Abort
except ImportError:  # pragma: no cover
    from click.exceptions import Abort

# Words that read as a value for a switch: "--json true" is "--json" plus the prompt "true".
_TRUTH_WORDS = {"true", "false", "yes", "no", "on", "off", "1", "0"}
USAGE_EXIT = 2


def version_text() -> str:
    """``trimix X (llama-cpp-python Y)``: the package's installed version and the llama.cpp binding's."""
    from importlib.metadata import PackageNotFoundError, version

    import trimix_cpp

    try:
        mine = version("trimix")
    except PackageNotFoundError:  # a source tree used without installing
        mine = trimix_cpp.__version__
    try:
        binding = f" (llama-cpp-python {version('llama-cpp-python')})"
    except PackageNotFoundError:  # pragma: no cover - it is a dependency
        binding = ""
    return f"trimix {mine}{binding}"


def _show_version(value: bool) -> None:
    if value:
        sys.stdout.write(version_text() + "\n")
        raise typer.Exit(0)


VersionOption = typer.Option(
    "--version", "-V", help="Print trimix's version and exit.", callback=_show_version, is_eager=True
)


def _subcommands(command: Any) -> dict[str, Any]:
    return getattr(command, "commands", None) or {}


def _is_switch(param: Any) -> bool:
    return bool(getattr(param, "is_flag", False)) and bool(getattr(param, "opts", ()))


def _switches(command: Any) -> dict[str, str]:
    """Every spelling of every on/off option of ``command`` -> its main spelling."""
    out: dict[str, str] = {}
    for p in command.params:
        if _is_switch(p):
            for name in (*p.opts, *p.secondary_opts):
                out[name] = p.opts[0] if p.opts else name
    return out


def _plain_switch_help(command: Any) -> None:
    """Switches show no type tag (``<bool>``) in help: they take no value."""
    helper = command.get_help_option(Context(command))  # built once per command, outside params
    for p in [*command.params, *([helper] if helper is not None else [])]:
        if _is_switch(p) and p.metavar is None:
            p.metavar = ""
    for sub in _subcommands(command).values():
        _plain_switch_help(sub)


def _resolve(group: Any, args: Sequence[str]) -> tuple[Any, int]:
    """The (sub)command ``args`` names, and how many of the args name it."""
    command, i = group, 0
    while i < len(args) and args[i] in _subcommands(command):
        command = _subcommands(command)[args[i]]
        i += 1
    return command, i


def _check_switch_values(group: Any, args: Sequence[str]) -> None:
    """Refuse ``--json true`` and the like: a switch takes no value, and the word after it would be
    read as the command's next argument (for ``generate``, the prompt)."""
    command, i = _resolve(group, args)
    switches = _switches(command)
    path = " ".join(["trimix", *args[:i]])
    for j in range(i, len(args) - 1):
        if args[j] == "--":
            break
        if args[j] in switches and args[j + 1].lower() in _TRUTH_WORDS:
            raise UsageError(
                f"{args[j]} is a switch and takes no value: write {args[j]} alone to turn it on "
                f"(a text argument '{args[j + 1]}' goes before the options or after --); see '{path} --help'"
            )


def _one_line(message: str) -> str:
    return " ".join(message.split())


class TrimixGroup(TyperGroup):
    """``trimix`` and its sub-groups: Typer's group with one-line usage errors (see the module)."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        _plain_switch_help(self)
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        try:
            _check_switch_values(self, argv)
            rv = super().main(argv, prog_name or "trimix", complete_var, standalone_mode=False, **extra)
        except UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # "trimix" or "trimix models" alone: the help
                sys.stdout.write(e.format_message().rstrip("\n") + "\n")
                sys.exit(e.exit_code)
            path = e.ctx.command_path if e.ctx is not None else " ".join(["trimix", *argv[: _resolve(self, argv)[1]]])
            where = f"; see '{path} --help'"
            message = _one_line(e.format_message()).rstrip(".")
            if "--help'" in message:
                where = ""
            err.print(f"[bold red]error:[/] {escape(message + where)}", soft_wrap=True)
            sys.exit(USAGE_EXIT)
        except ClickException as e:
            err.print(f"[bold red]error:[/] {escape(_one_line(e.format_message()))}", soft_wrap=True)
            sys.exit(e.exit_code)
        except Abort:
            err.print("[bold red]error:[/] interrupted", soft_wrap=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


__all__ = ["TrimixGroup", "VersionOption", "version_text"]
