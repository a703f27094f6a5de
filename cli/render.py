"""Rich output for people: the perplexity landscape as a heat map, and progress bars.

Where output goes: stdout carries a command's answer (the generated text, one JSON object with
``--json``, or, without it, the table that is the answer of ``select``, ``ppl``, ``eval``,
``inspect``, ``models`` and ``bench``), so ``> file`` keeps exactly that; stderr carries how the run
went (progress bars, statistics, notes, warnings and errors). :data:`out` is stdout's console,
:data:`trimix_cli.common.err` stderr's.
"""

from __future__ import annotations

import math

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from trimix_cpp.finite import perplexity
from trimix_cpp.selection import Selection

out = Console()

_ROLE_NAMES = {"large_ins": "large-ins", "small_cpt": "small-cpt", "small_base": "small-base"}


def _heat(value: float, lo: float, hi: float) -> str:
    """Green for the best cells, red for the worst, on a log scale (perplexities span decades)."""
    if not math.isfinite(value) or hi <= lo:
        return "white"
    x = (math.log(value) - math.log(lo)) / (math.log(hi) - math.log(lo)) if lo > 0 else 0.0
    x = min(max(x, 0.0), 1.0)
    r, g = int(255 * x), int(255 * (1 - x))
    return f"rgb({r},{g},60)"


def landscape(console: Console, sel: Selection) -> None:
    """Rows alpha, columns beta, cells perplexity (or entropy); the chosen cell is marked."""
    is_ppl = sel.strategy == "ppl"
    values = [[perplexity(v) if is_ppl else v for v in row] for row in sel.scores.tolist()]
    flat = [v for row in values for v in row if math.isfinite(v)]
    lo, hi = (min(flat), max(flat)) if flat else (0.0, 0.0)
    what = "perplexity of the prompt" if is_ppl else "entropy of the first generated token (nats)"
    table = Table(title=f"TriMix {sel.strategy.upper()} landscape: {what}", title_justify="left")
    table.add_column("alpha \\ beta", justify="right", style="bold")
    for b in sel.betas:
        table.add_column(f"{b:g}", justify="right")
    for i, a in enumerate(sel.alphas):
        cells = []
        for j, b in enumerate(sel.betas):
            v = values[i][j]
            label = f"{v:.4g}"
            if (a, b) == sel.chosen:
                cells.append(Text(f"*{label}", style=f"bold black on {_heat(v, lo, hi) if is_ppl else 'yellow'}"))
            else:
                cells.append(Text(label, style=_heat(v, lo, hi) if is_ppl else ""))
        table.add_row(f"{a:g}", *cells)
    console.print(table)
    a, b = sel.chosen
    console.print(f"chosen: alpha={a:g} beta={b:g} (third weight {1 - a - b:g}), marked *", soft_wrap=True)
    if sel.single_nll:
        singles = ", ".join(f"{_ROLE_NAMES.get(r, r)} {perplexity(v):.3f}" for r, v in sel.single_nll.items())
        console.print(f"single models' perplexity: {singles}", soft_wrap=True)


def progress(console: Console, *, counts: bool = True, rate: bool = False, transient: bool = False) -> Progress:
    """A progress bar on ``console``: each task's description and bar, then with ``counts`` items done
    of the total and the time left, with ``rate`` the task's ``rate`` field (text the caller updates);
    ``transient`` clears it when done."""
    columns: list[ProgressColumn] = [TextColumn("{task.description}"), BarColumn()]
    if counts:
        columns.append(MofNCompleteColumn())
    if rate:
        columns.append(TextColumn("{task.fields[rate]}"))
    columns.append(TimeElapsedColumn())
    if counts:
        columns += [TextColumn("left"), TimeRemainingColumn()]
    return Progress(*columns, console=console, transient=transient)
