"""``trimix models``: the profiles found, whether their files are present, and adding one."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import trimix_cpp as tm
from trimix_cpp._llama import LlamaModel
from trimix_cpp.lock import provenance, summarize
from trimix_cpp.modelinfo import kv_cache_bytes
from trimix_cpp.profiles import (
    OPTIONAL_ROLES,
    Profile,
    all_profiles,
    check_n_ctx,
    check_new_profile,
    find_profile,
    user_profiles_dir,
    write_profile,
)

from . import convert as convert_cmd
from . import pull as pull_cmds
from .common import Verbose, err, errors
from .options import TrimixGroup

app = typer.Typer(
    help="List, check and add language profiles; convert and quantize models.", no_args_is_help=True, cls=TrimixGroup
)
app.command("convert")(convert_cmd.convert)
app.command("quantize")(convert_cmd.quantize)
out = Console()
pull_cmds.register(app)  # pull, verify, bundle, install


def _file_mark(profile: Profile, role: str) -> str:
    """✓ present, ✗ missing (the profile's method needs it), ○ missing but optional."""
    name = role.replace("_", "-")
    if profile.present(role):
        return f"[green]✓[/] {name}" + (" (optional)" if profile.is_optional(role) else "")
    if profile.is_optional(role):
        return f"[dim]○ {name} (optional: {', '.join(OPTIONAL_ROLES[role])})[/]"
    return f"[red]✗[/] {name}"


@app.command("list")
def list_cmd(verbose: Verbose = False) -> None:
    """Every profile --lang can find, and whether each of its model files is present (○: an
    optional model, absent; it enables only the methods named)."""
    with errors(verbose):
        profiles, problems = all_profiles()
        table = Table(title="trimix profiles (--lang CODE)", title_justify="left")
        for col in ("lang", "name", "model files", "installed", "profile"):
            table.add_column(col, overflow="fold")
        for p in profiles:
            files = " ".join(_file_mark(p, r) for r in p.models)
            table.add_row(p.lang, p.name, files, summarize(provenance(p)), _short(p.path))
        out.print(table)
        for line in problems:
            err.print(f"[yellow]warning:[/] {escape(line)}", soft_wrap=True)


def _short(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


@app.command()
def check(
    lang: Annotated[str, typer.Option("--lang", "-l", help="The profile to check.")],
    n_ctx: Annotated[int | None, typer.Option("--n-ctx", help="Context for the memory estimate.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    verbose: Verbose = False,
) -> None:
    """Check a profile: files exist and are GGUF, vocabularies fuse, and how much memory it needs.

    An optional model (the large base, used only by trimix4) that is absent is reported, not a failure.
    """
    with errors(verbose):
        tm._llama.set_verbose(verbose)
        profile = find_profile(lang)
        ctx = profile.n_ctx if n_ctx is None else check_n_ctx(n_ctx, "n_ctx")
        absent = [r for r in profile.models if profile.is_optional(r) and not profile.present(r)]
        paths = profile.paths(tuple(r for r in profile.models if r not in absent))
        fusion = tm.inspect_models(list(paths.values()))
        rows, total = [], 0
        for role, path in paths.items():
            with LlamaModel(path, vocab_only=True) as m:
                kv = kv_cache_bytes(m, ctx)
            size = path.stat().st_size
            total += size + kv
            rows.append({"role": role, "file": str(path), "weights_bytes": size, "kv_cache_bytes": kv})
        result = {
            "lang": profile.lang,
            "profile": str(profile.path),
            "models": rows,
            "fusable": fusion.fusable,
            "shared_vocab": fusion.shared_vocab,
            "reason": fusion.reason,
            "n_ctx": ctx,
            "memory_estimate_bytes": total,
            "optional_absent": [{"role": r, "enables": list(OPTIONAL_ROLES[r])} for r in absent],
        }
        if as_json:
            sys.stdout.write(json.dumps(result, ensure_ascii=False) + "\n")
        else:
            table = Table(title=f"--lang {profile.lang} ({profile.name}): {profile.path}", title_justify="left")
            for col in ("role", "file", "weights", f"KV cache @ {ctx}"):
                table.add_column(col, justify="right" if col != "role" and col != "file" else "left")
            for r in rows:
                table.add_row(r["role"], r["file"], _gib(r["weights_bytes"]), _gib(r["kv_cache_bytes"]))
            out.print(table)
            mark = "[green]fusable[/]" if fusion.fusable else "[red]not fusable[/]"
            out.print(f"{mark}: {fusion.reason}; shared vocabulary {fusion.shared_vocab:,} tokens", soft_wrap=True)
            out.print(f"memory estimate (weights + KV cache for n_ctx={ctx}): {_gib(total)}", soft_wrap=True)
            for r in absent:
                methods = ", ".join(f"--method {m}" for m in OPTIONAL_ROLES[r])
                out.print(
                    f"[dim]optional {r.replace('_', '-')} absent: everything but {methods} runs without it[/]",
                    soft_wrap=True,
                )
        if not fusion.fusable:
            raise typer.Exit(1)


@app.command()
def add(
    lang: Annotated[str, typer.Option("--lang", "-l", help="Language code of the new profile.")],
    large_ins: Annotated[Path, typer.Option("--large-ins", help="GGUF of the large instruction model.")],
    small_cpt: Annotated[Path, typer.Option("--small-cpt", help="GGUF of the small continued model.")],
    small_base: Annotated[Path, typer.Option("--small-base", help="GGUF of the small base model.")],
    large_base: Annotated[Path | None, typer.Option("--large-base", help="GGUF of the large base model.")] = None,
    name: Annotated[str | None, typer.Option(help="Language name shown in listings.")] = None,
    n_ctx: Annotated[int, typer.Option("--n-ctx", help="Default context length.")] = 4096,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing user profile.")] = False,
    verbose: Verbose = False,
) -> None:
    """Write a user profile after checking that its models load and fuse."""
    with errors(verbose):
        tm._llama.set_verbose(verbose)
        check_new_profile(lang, name, n_ctx)  # before the models load, and so that the file reads back
        models = {tm.LARGE_INS: large_ins, tm.SMALL_CPT: small_cpt, tm.SMALL_BASE: small_base}
        if large_base is not None:
            models[tm.LARGE_BASE] = large_base
        fusion = tm.inspect_models(list(models.values()))
        if not fusion.fusable:
            raise tm.TrimixError(f"not adding {lang}: {fusion.reason}")
        target = user_profiles_dir() / f"{lang}.toml"
        if target.exists() and not force:
            raise tm.TrimixError(f"{target} exists (pass --force to replace it)")
        write_profile(target, lang, models, name=name, n_ctx=n_ctx)
        err.print(f'wrote {target}; use it with: trimix generate --lang {lang} "..."', soft_wrap=True)
