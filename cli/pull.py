"""``trimix models pull / verify / bundle / install``: getting a profile's models, checked, onto a
machine with network or, through one file, onto one without."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

import trimix_cpp as tm
from trimix_cpp.bundle import install_bundle, make_bundle
from trimix_cpp.lock import lock_path, read_lock, verify_files, write_lock
from trimix_cpp.profiles import find_profile, model_dirs
from trimix_cpp.pull import PullPlan, parse_type_overrides, plan_pull, run_pull, save_user_profile, with_types

from .common import Verbose, err, errors

Lang = Annotated[str, typer.Option("--lang", "-l", help="The language profile (bod, uig, kaz, mvf, ...).")]


@contextmanager
def progress_bars() -> Iterator[Callable[[str, int, int], None]]:
    """A ``progress(label, done, total)`` callback drawing one rich bar per label on stderr."""
    with Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as bars:
        tasks: dict[str, int] = {}

        def update(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = bars.add_task(label, total=total or None)
            bars.update(tasks[label], completed=done, total=total or None)

        yield update


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _print_plan(plan: PullPlan) -> None:
    table = Table(title=f"pull --lang {plan.profile.lang} into {plan.models_dir}", title_justify="left")
    for col in ("role", "source", "commit", "makes", "download", "scratch", "result", ""):
        table.add_column(col, justify="right" if col in ("download", "scratch", "result") else "left")
    for r in plan.roles:
        what = f"convert to {r.source.type}" if r.source.kind == "checkpoint" else f"GGUF {r.source.gguf}"
        state = {"installed": "installed, verified", "reuse": "present (another lock)", "fetch": "to fetch"}[r.status]
        sizes = (
            [_size(r.download_bytes), _size(r.scratch_bytes), _size(r.result_bytes)]
            if r.status == "fetch"
            else [""] * 3
        )
        commit = (r.commit or "")[:12]
        table.add_row(r.role, f"{r.source.repo}@{r.source.revision}", commit, what, *sizes, state)
    for role, why in plan.skipped.items():
        table.add_row(role, "", "", "", "", "", "", why)
    err.print(table)
    if plan.to_fetch:
        err.print(
            f"disk: the pull needs {_size(plan.needed_bytes)} at its peak; {_size(plan.free_bytes)} free in "
            f"{escape(str(plan.models_dir))}",
            soft_wrap=True,
        )


def pull(
    lang: Lang,
    type_: Annotated[
        list[str] | None,
        typer.Option(
            "--type",
            help="Convert to this GGUF type instead of the profile's (TYPE for every converted role, or "
            "ROLE=TYPE; repeatable). The files are named after the type and the profile is updated to name "
            "them (a shipped profile is first copied to your config folder).",
        ),
    ] = None,
    role: Annotated[
        list[str] | None,
        typer.Option(
            "--role",
            help="Pull only this role (repeatable), e.g. all but large-base, which only --method trimix4 uses.",
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Resolve and size everything, fetch nothing.")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace files in the models folder that no lock file records.")
    ] = False,
    check: Annotated[bool, typer.Option("--check/--no-check", help="Run models check once installed.")] = True,
    verbose: Verbose = False,
) -> None:
    """Fetch a profile's models from the Hub, convert them, install them and write their lock file.

    Resumes interrupted downloads; checks every file against its published hash; does nothing (and
    needs no network) when everything is already installed and verified. Honours HF_TOKEN,
    HF_ENDPOINT and HF_HUB_OFFLINE. Files go to $TRIMIX_MODELS or ~/.local/share/trimix/models.
    """
    with errors(verbose):
        original = find_profile(lang)
        profile = with_types(original, parse_type_overrides(type_ or [], original))
        with progress_bars() as progress:
            roles = [r.replace("-", "_") for r in role] if role else None
            plan = plan_pull(profile, roles=roles, force=force, progress=progress)
        _print_plan(plan)
        if dry_run:
            return
        if not plan.to_fetch:
            with progress_bars() as progress:
                run_pull(plan, progress)
            err.print(
                f"nothing to do: every pulled model of --lang {lang} is installed and verified in "
                f"{escape(str(plan.models_dir))}",
                soft_wrap=True,
            )
            return
        with progress_bars() as progress:
            run_pull(plan, progress)
        saved = save_user_profile(original, profile)
        if saved is not None:
            err.print(f"saved the profile with the new types to {escape(str(saved))}", soft_wrap=True)
        err.print(
            f"[green]installed[/] --lang {lang} in {escape(str(plan.models_dir))}; lock: "
            f"{escape(str(lock_path(plan.models_dir, profile.lang)))}",
            soft_wrap=True,
        )
        if check and not plan.skipped:
            from .models import check as check_cmd

            check_cmd(lang=lang, n_ctx=None, as_json=False, verbose=verbose)


def _find_lock(lang: str) -> tuple[Path, tm.TrimixError | None]:
    for d in model_dirs():
        if lock_path(d, lang).is_file():
            return d, None
    where = ", ".join(str(d) for d in model_dirs())
    return Path(), tm.TrimixError(
        f"no lock file for --lang {lang} in {where}: its files were not pulled or installed by trimix, so there "
        f"is nothing to verify them against (trimix models pull --lang {lang})"
    )


def verify(lang: Lang, verbose: Verbose = False) -> None:
    """Recompute every file's sha256 against the lock file (offline) and say which one differs."""
    with errors(verbose):
        profile = find_profile(lang)
        models_dir, problem = _find_lock(lang)
        if problem is not None:
            raise problem
        lock = read_lock(models_dir, lang)
        assert lock is not None
        with progress_bars() as progress:
            checks = verify_files(lock, models_dir, progress)
        write_lock(models_dir, lock)  # remember what verified, so models list can say so cheaply
        table = Table(title=f"verify --lang {lang}: {lock_path(models_dir, lang)}", title_justify="left")
        for col in ("role", "file", "result"):
            table.add_column(col)
        for c in checks:
            mark = "[green]ok[/]" if c.status == "ok" else f"[red]{c.status}[/]: {escape(c.detail)}"
            table.add_row(c.role, c.name, mark)
        for role in profile.models:
            if role not in lock.roles:
                table.add_row(role, profile.models[role], "[yellow]not in the lock (placed by hand)[/]")
        err.print(table)
        bad = [c for c in checks if c.status != "ok"]
        if bad:
            c = bad[0]
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise tm.TrimixError(
                f"{c.path} differs from the lock: {c.detail}{more}; pull it again (trimix models pull --lang "
                f"{lang} --force) or reinstall its bundle"
            )
        err.print(f"[green]verified[/]: all {len(checks)} files of --lang {lang} match their lock", soft_wrap=True)


def bundle(
    lang: Lang,
    output: Annotated[Path, typer.Option("--output", "-o", help="The bundle file to write (e.g. bod.trimix.tar).")],
    verbose: Verbose = False,
) -> None:
    """Write one file with the profile, its GGUF files and their lock, for a machine without network."""
    with errors(verbose):
        profile = find_profile(lang)
        with progress_bars() as progress:
            out = make_bundle(profile, output, progress)
        err.print(
            f"wrote {escape(str(out))} ({_size(out.stat().st_size)}); on the other machine: "
            f"trimix models install {escape(out.name)}",
            soft_wrap=True,
        )


def install(
    bundle_file: Annotated[Path, typer.Argument(help="The bundle written by trimix models bundle ('-': stdin).")],
    force: Annotated[
        bool, typer.Option("--force", help="Replace a user profile or model files that differ from the bundle's.")
    ] = False,
    verbose: Verbose = False,
) -> None:
    """Install a bundle: every file checked against its sha256 while it is read, all or nothing."""
    with errors(verbose):
        with progress_bars() as progress:
            done = install_bundle(bundle_file, force=force, progress=progress)
        kept = f" ({len(done.already_present)} already there)" if done.already_present else ""
        where = f"; profile written to {done.profile_path}" if done.profile_written else ""
        err.print(
            f"[green]installed[/] --lang {done.lang}: {len(done.files)} files in {escape(str(done.models_dir))}"
            f'{kept}{escape(where)}; try: trimix generate --lang {done.lang} "..."',
            soft_wrap=True,
        )


def register(app: typer.Typer) -> None:
    """Add the commands to ``trimix models``."""
    app.command("pull")(pull)
    app.command("verify")(verify)
    app.command("bundle")(bundle)
    app.command("install")(install)
