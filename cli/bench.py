"""``trimix bench``: measure this machine with these models and print the settings to use."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

import trimix_cpp as tm
from trimix_cpp.bench import BenchReport, run_bench
from trimix_cpp.modelset import ModelSet
from trimix_cpp.selection import SELECTION_ROLES

from .common import Verbose, err, errors
from .options import Threads, group, grouped, model_set
from .render import out, progress

BENCH_HELP = (
    "Measure prompt and decode speed of each model and the fused trio, speculative decoding and "
    "parallel sequences on this machine, and recommend --threads, --draft and --parallel."
)


# bench's own wording of shared options
WORDING = {
    "lang": Annotated[str | None, typer.Option("--lang", "-l", help="Language profile whose models to measure.")],
    "small_cpt": Annotated[Path | None, typer.Option("--small-cpt", help="GGUF of the small continued model.")],
}


def _ints(name: str, text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise tm.TrimixError(f"--{name} takes comma-separated whole numbers, e.g. 1,4,8; got {text!r}") from None
    if not values:
        raise tm.TrimixError(f"--{name} needs at least one value")
    return values


@grouped
def bench(
    modelset: ModelSet = group(model_set, "lang", *SELECTION_ROLES, own=WORDING),
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", help="Prompt length to evaluate.")] = 256,
    tokens: Annotated[int, typer.Option("--tokens", "-n", help="Tokens to decode per measurement.")] = 64,
    drafts: Annotated[str, typer.Option("--drafts", help="Draft lengths to try, comma-separated.")] = "2,4,6",
    parallel: Annotated[str, typer.Option("--parallel", help="Sequence counts to try, comma-separated.")] = "1,4,8",
    time_s: Annotated[float, typer.Option("--time", help="Seconds the measurements may start within.")] = 90.0,
    threads: Threads = 0,
    n_gpu_layers: Annotated[int, typer.Option("--n-gpu-layers", "-ngl", help="Layers on the GPU (-1: all).")] = -1,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    verbose: Verbose = False,
) -> None:
    with errors(verbose):
        paths = modelset.paths(SELECTION_ROLES, "trimix bench")
        options = tm.LoadOptions(n_threads=threads or None, n_gpu_layers=n_gpu_layers, verbose=verbose)
        with progress(err, counts=False, transient=True) as bar:
            task = bar.add_task("loading", total=1.0)
            report = run_bench(
                paths,
                options,
                prompt_tokens=prompt_tokens,
                gen_tokens=tokens,
                drafts=_ints("drafts", drafts),
                parallel=_ints("parallel", parallel),
                budget_s=time_s,
                progress=lambda what, done: bar.update(task, description=what, completed=done),
            )
        if as_json:
            sys.stdout.write(json.dumps(report.as_dict(), ensure_ascii=False) + "\n")
        else:
            _print(report)


def _print(report: BenchReport) -> None:
    """The report on stdout (it is the command's answer); measurements skipped for time on stderr."""
    out.print(f"[dim]{report.system}[/]", soft_wrap=True)
    t = Table(title=f"trimix bench ({report.threads} threads, {report.seconds:.0f} s)", title_justify="left")
    t.add_column("measurement")
    t.add_column("tokens/s", justify="right")
    t.add_column("note")
    for name, v in report.prompt_tokens_per_s.items():
        t.add_row(f"prompt, {name}", f"{v:.1f}", f"{report.prompt_tokens} tokens")
    weights = ", ".join(f"{r}={w:g}" for r, w in report.fused_weights.items())
    for name, v in report.decode_tokens_per_s.items():
        t.add_row(f"decode, {name}", f"{v:.1f}", weights if name == "fused" else "")
    plain = report.decode_tokens_per_s.get("fused", 0.0)
    for n, v in sorted(report.threads_tokens_per_s.items(), reverse=True):
        t.add_row(f"fused, {n} threads", f"{v:.1f}", "")
    for k, v in report.draft_tokens_per_s.items():
        ratio = f"{v / plain:.2f}x plain" if plain else ""
        t.add_row(f"fused, --draft {k}", f"{v:.1f}", f"{ratio}, {report.draft_acceptance[k]:.0%} accepted")
    one = report.parallel_tokens_per_s.get(1)
    for p, v in report.parallel_tokens_per_s.items():
        ratio = f"{v / one:.2f}x one sequence" if one else ""
        t.add_row(f"fused, --parallel {p} (aggregate)", f"{v:.1f}", ratio)
    out.print(t)
    for what in report.skipped:
        err.print(f"[yellow]skipped (--time reached):[/] {what}", soft_wrap=True)
    rec = report.recommended
    flags = " ".join(f"--{k} {v}" for k, v in rec.items())
    out.print(f"recommended here: {flags} (more only where it gained 5 % or more)", soft_wrap=True)
