"""The command line's conventions, in one place: ``--version``, help without type tags on switches,
usage errors as one line, and the options several commands share.

Typer's own usage errors are boxed panels of several lines, beside the project's promise that every
error is one line; its help prints ``<bool>`` after every switch, which invites ``--json true`` (then
read as the prompt "true"). :class:`TrimixGroup` is the click group of ``trimix`` and of its
sub-groups: it prints a usage error (unknown option, missing argument, bad value) as one line that
points at ``--help``, exit code 2, and refuses a switch followed by a truth value before the command
runs, so ``--json true`` says what it is instead of generating from "true".

Options that several commands take are declared here once, as ``Annotated`` types, so each
command's signature names them and the help text stays the same everywhere. Options that go
together (the model files, the fusion choice, the sampling settings, how the engine loads) form a
:class:`Group`: a command declares one parameter whose default is the group, :func:`grouped` puts
the group's options in its place (so ``--help`` lists them there) and hands the command the object
the group builds from them (a :class:`~trimix_cpp.modelset.ModelSet`, a
:class:`~trimix_cpp.methods.MethodChoice`, ...), with the library's own names and rules.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from typer.core import TyperGroup

import trimix_cpp as tm
from trimix_cpp.fusion import ROLES
from trimix_cpp.methods import SAMPLING_FIELDS, MethodChoice, resolve_fusion
from trimix_cpp.modelset import ModelSet
from trimix_cpp.selection import DEFAULT_MAX_LOGITS_MIB, Selector

from .common import err, errors

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


# -- options several commands share ------------------------------------------------------------

Lang = Annotated[
    str | None,
    typer.Option("--lang", "-l", help="Language profile (bod, uig, kaz, mvf, demo, ...): models and defaults."),
]
LargeIns = Annotated[Path | None, typer.Option("--large-ins", help="GGUF of the large instruction model.")]
SmallCpt = Annotated[
    Path | None, typer.Option("--small-cpt", help="GGUF of the small model continued on the language.")
]
SmallBase = Annotated[Path | None, typer.Option("--small-base", help="GGUF of the small base model.")]
LargeBase = Annotated[Path | None, typer.Option("--large-base", help="GGUF of the large base model (trimix4 only).")]
Raw = Annotated[bool, typer.Option("--raw", help="Send the prompt as it is, without the profile's template.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]

NCtx = Annotated[
    int | None, typer.Option("--n-ctx", help="Context length in tokens (prompt + generation); default 4096.")
]
Threads = Annotated[int, typer.Option("--threads", "-t", help="CPU threads per model (0: every core).")]
NGpu = Annotated[
    int, typer.Option("--n-gpu-layers", "-ngl", help="Layers on the GPU (-1: all, if the build has a GPU).")
]

Method = Annotated[str | None, typer.Option(help="trimix | trimix4 | proxy | contrastive | single (default: trimix)")]
Alpha = Annotated[float | None, typer.Option(help="Weight of the large instruction model.")]
Beta = Annotated[float | None, typer.Option(help="Weight of the small continued model.")]
Gamma = Annotated[float | None, typer.Option(help="Scaling weight (trimix4).")]
Role = Annotated[str | None, typer.Option(help="The model used by --method single (default large_ins).")]
Select = Annotated[
    str | None,
    typer.Option(
        "--select",
        help="How TriMix picks (alpha, beta): fixed (--alpha/--beta), ppl (lowest fused perplexity of the "
        "prompt) or ent (lowest entropy of the first generated token). Default: fixed when --alpha and "
        "--beta are given, else ppl. Ties go to the smaller alpha, then the smaller beta.",
    ),
]
GridAlpha = Annotated[str | None, typer.Option("--grid-alpha", help="Alpha values to try, e.g. 0.1,0.5,0.9.")]
GridBeta = Annotated[
    str | None, typer.Option("--grid-beta", help="Beta values to try (default 0.1,0.3,0.5,0.7,0.9,1).")
]
MaxLogits = Annotated[
    float | None,
    typer.Option(
        "--max-logits-mib",
        help=f"Memory bound for perplexity selection's logits, in MiB (default {DEFAULT_MAX_LOGITS_MIB:g}).",
    ),
]
WeightsFrom = Annotated[
    Path | None, typer.Option("--weights-from", help="Use the (alpha, beta) saved by trimix calibrate.")
]

Temperature = Annotated[
    float | None, typer.Option("--temperature", "--temp", help="Sampling temperature (default 0: greedy).")
]
TopK = Annotated[int | None, typer.Option(help="Keep the k most likely tokens (0: off).")]
TopP = Annotated[float | None, typer.Option(help="Nucleus sampling mass (1: off).")]
MinP = Annotated[float | None, typer.Option(help="Drop tokens below min_p x the top probability.")]
Seed = Annotated[int | None, typer.Option(help="Sampling seed: same seed, same output (default 0).")]
RepeatPenalty = Annotated[
    float | None, typer.Option(help="Penalise tokens seen in the last --repeat-last-n tokens (1: off).")
]
RepeatLastN = Annotated[
    int | None, typer.Option(help="Tokens the penalties look back over, prompt included (default 64; -1: all).")
]
FrequencyPenalty = Annotated[
    float | None, typer.Option(help="Subtracted from a token's logit per occurrence in the window (0: off).")
]
PresencePenalty = Annotated[
    float | None, typer.Option(help="Subtracted once from the logit of a token in the window (0: off).")
]

# Every shared option by parameter name: its type and its default.
OPTIONS: dict[str, tuple[Any, Any]] = {
    "lang": (Lang, None),
    "large_ins": (LargeIns, None),
    "small_cpt": (SmallCpt, None),
    "small_base": (SmallBase, None),
    "large_base": (LargeBase, None),
    "n_ctx": (NCtx, None),
    "threads": (Threads, 0),
    "n_gpu_layers": (NGpu, -1),
    "method": (Method, None),
    "alpha": (Alpha, None),
    "beta": (Beta, None),
    "gamma": (Gamma, None),
    "role": (Role, None),
    "select": (Select, None),
    "grid_alpha": (GridAlpha, None),
    "grid_beta": (GridBeta, None),
    "max_logits_mib": (MaxLogits, None),
    "weights_from": (WeightsFrom, None),
    "temperature": (Temperature, None),
    "top_k": (TopK, None),
    "top_p": (TopP, None),
    "min_p": (MinP, None),
    "seed": (Seed, None),
    "repeat_penalty": (RepeatPenalty, None),
    "repeat_last_n": (RepeatLastN, None),
    "frequency_penalty": (FrequencyPenalty, None),
    "presence_penalty": (PresencePenalty, None),
}


# -- groups of options ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """Options a command takes together, and what they build: ``build(**values)``."""

    build: Callable[..., Any]
    options: tuple[tuple[str, Any, Any], ...]  # (parameter name, Annotated type, default), in help order


def group(
    build: Callable[..., Any],
    *options: str | tuple[str, Any, Any],
    own: Mapping[str, Any] | None = None,
) -> Any:
    """A :class:`Group` of the options named, in that order: the shared ones, in a command's ``own``
    wording where it has one (name -> ``Annotated`` type), or ``(name, type, default)`` for an option
    of the command's own.

    Typed ``Any``: it stands as the default of the parameter that receives what it builds.
    """
    own = own or {}
    out = []
    for item in options:
        if isinstance(item, str):
            kind, default = OPTIONS.get(item, (None, None))
            out.append((item, own.get(item, kind), default))
        else:
            out.append(item)
    return Group(build, tuple(out))


def grouped(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` as Typer sees it: every parameter whose default is a :class:`Group` becomes that
    group's options, in its place, and the command receives the built object under the parameter's name."""
    signature = inspect.signature(command, eval_str=True)
    params: list[inspect.Parameter] = []
    groups: dict[str, Group] = {}
    for p in signature.parameters.values():
        if isinstance(p.default, Group):
            groups[p.name] = p.default
            params += [inspect.Parameter(n, p.kind, default=d, annotation=a) for n, a, d in p.default.options]
        else:
            params.append(p)

    @functools.wraps(command)
    def run(**values: Any) -> Any:
        with errors(values.get("verbose", False)):  # a group's own check fails as the command's would
            for name, g in groups.items():
                values[name] = g.build(**{n: values.pop(n) for n, _, _ in g.options})
        return command(**values)

    del run.__wrapped__  # Typer reads the signature below, not the command's
    run.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params}
    return run


def model_set(lang: str | None = None, **paths: Path | None) -> ModelSet:
    """``--lang`` and the model files given (see :class:`ModelSet`)."""
    return ModelSet.make(lang, paths)


@dataclass(frozen=True)
class EngineArgs:
    """How the engine loads: ``--n-ctx``, ``--threads``, ``--n-gpu-layers``."""

    n_ctx: int | None = None
    threads: int = 0
    n_gpu_layers: int = -1

    def options(self, modelset: ModelSet, verbose: bool, **extra: Any) -> tm.LoadOptions:
        return modelset.load_options(self.n_ctx, self.threads, self.n_gpu_layers, verbose, **extra)

    def open(self, modelset: ModelSet, paths: Mapping[str, Path], verbose: bool, **extra: Any) -> tm.Engine:
        """The engine of ``paths`` loaded with these options (and ``extra`` :class:`LoadOptions` fields)."""
        return tm.Engine(paths, self.options(modelset, verbose, **extra))


def selection(
    strategy: str = "ppl",
    grid_alpha: str | None = None,
    grid_beta: str | None = None,
    max_logits_mib: float | None = None,
) -> MethodChoice:
    """``--strategy`` and its grid flags as the choice of a selection (checked by :func:`selector`)."""
    return MethodChoice(select=strategy, grid_alpha=grid_alpha, grid_beta=grid_beta, max_logits_mib=max_logits_mib)


def selector(choice: MethodChoice) -> Selector:
    """The selector a :func:`selection` choice asks for, checked as ``--select`` is."""
    fusion = resolve_fusion(choice)
    assert isinstance(fusion, Selector)
    return fusion


MODELS_TRIO = group(model_set, "lang", "large_ins", "small_cpt", "small_base")
MODELS = group(model_set, "lang", *ROLES)
ENGINE = group(EngineArgs, "n_ctx", "threads", "n_gpu_layers")
FUSION = group(MethodChoice, *(f.name for f in fields(MethodChoice)))  # every flag of the library's choice
SAMPLING = group(dict, *SAMPLING_FIELDS)  # sampling_params's keyword arguments
GRID = ("grid_alpha", "grid_beta", "max_logits_mib")  # a selection's grid and memory bound


__all__ = ["TrimixGroup", "VersionOption", "version_text"]
