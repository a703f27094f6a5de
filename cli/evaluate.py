"""``trimix eval``: the paper's comparison on your tasks, models and language, resumable.

The run itself is :func:`trimix_cpp.evaluation.pipeline.run_evaluation`; this module shows it: progress
bars and warnings on stderr, the results table on stdout, and the plot.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

import trimix_cpp as tm
from trimix_cpp.calibrate import check_output_path
from trimix_cpp.evaluation.pipeline import EvalConfig, LocalBackend, OpenBackend, run_evaluation
from trimix_cpp.evaluation.predict import calibration_path
from trimix_cpp.evaluation.results import Results

from .common import err
from .render import out, progress


def show(results: Results, console: Console) -> None:
    table = Table(title="results (upper-bound is an oracle: it picks weights with the labels)", title_justify="left")
    table.add_column("method")
    for t in results.tasks:
        table.add_column(f"{t}\n{results.metrics[t]}", justify="right")
    table.add_column("avg", justify="right")
    table.add_column("gain vs best single", justify="right")
    best_avg = max((results.average(m) for m in results.methods if m != "upper-bound"), default=math.nan)
    for m in results.methods:
        avg = results.average(m)
        cells = [f"{results.scores[t][m]:.2f}" if m in results.scores[t] else "-" for t in results.tasks]
        gain = results.gain(m)
        style = "bold" if avg == best_avg else ("dim" if m == "upper-bound" else "")
        table.add_row(
            m,
            *cells,
            "-" if math.isnan(avg) else f"{avg:.2f}",
            "-" if math.isnan(gain) else f"{gain:+.1f}%",
            style=style,
        )
    console.print(table)


def check_plot(path: Path) -> None:
    """Refuse, before the run, a --plot that could not be drawn or written at its end."""
    check_output_path(path, "--plot", "results.png")
    if importlib.util.find_spec("matplotlib") is None:
        raise tm.TrimixError(_NO_MATPLOTLIB)


_NO_MATPLOTLIB = "--plot needs matplotlib, which is not installed: pip install 'trimix[plot]' (or -e '.[plot]')"


def plot(results: Results, out_dir: Path, path: Path) -> None:
    """Per-task bars of every method, and the calibration PPL landscape of each task."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise tm.TrimixError(_NO_MATPLOTLIB) from None
    landscapes = [(t, calibration_path(out_dir, t)) for t in results.tasks]
    landscapes = [(t, p) for t, p in landscapes if p.is_file()]
    cols = 1 + len(landscapes)
    fig, axes = plt.subplots(1, cols, figsize=(6 + 4 * len(landscapes), 4), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / max(len(results.methods), 1)
    for k, m in enumerate(results.methods):
        vals = [results.scores[t].get(m, math.nan) for t in results.tasks]
        ax.bar([i + k * width for i in range(len(results.tasks))], vals, width, label=m)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(results.tasks))], results.tasks, fontsize=8)
    ax.set_ylabel("score")
    ax.legend(fontsize=6)
    for j, (t, p) in enumerate(landscapes, start=1):
        cal = json.loads(p.read_text(encoding="utf-8"))
        a_ax = axes[0][j]
        im = a_ax.imshow(cal["scores"], cmap="viridis_r")  # NLL = log perplexity: readable over decades
        a_ax.set_xticks(range(len(cal["grid_beta"])), [f"{b:g}" for b in cal["grid_beta"]])
        a_ax.set_yticks(range(len(cal["grid_alpha"])), [f"{a:g}" for a in cal["grid_alpha"]])
        a_ax.set_xlabel("beta (small-cpt)")
        a_ax.set_ylabel("alpha (large-ins)")
        a_ax.set_title(f"{t}: prompt NLL per token (nats)", fontsize=9)
        fig.colorbar(im, ax=a_ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


class RichReporter:
    """Warnings as yellow lines, and a progress bar per task, on stderr."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._bar: Progress | None = None
        self._ids: dict[str, object] = {}
        self._started = 0.0
        self._done = 0

    def warning(self, message: str) -> None:
        err.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)

    def start(self, task: str, total: int) -> None:
        self._bar = progress(self.console, rate=True)
        self._bar.start()
        self._ids[task] = self._bar.add_task(task, total=total, rate="")
        self._started, self._done = time.perf_counter(), 0

    def advance(self, task: str) -> None:
        assert self._bar is not None
        self._done += 1
        rate = self._done / max(time.perf_counter() - self._started, 1e-9)
        self._bar.update(self._ids[task], advance=1, rate=f"{rate:.2f} it/s")

    def finish(self, task: str) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def run_eval(
    tasks: list[str],
    modelset,
    options: tm.LoadOptions,
    cfg: EvalConfig,
    plot_file: Path | None,
    backend: OpenBackend = LocalBackend,
) -> Results:
    """Run the evaluation with progress on stderr, then show the table (and draw the plot)."""
    results = run_evaluation(tasks, modelset, options, cfg, RichReporter(Console(stderr=True)), backend)
    show(results, out)
    for task, t in cfg.timings.items():
        if t.get("calibration_s"):
            err.print(f"[dim]{task}: per-task calibration took {t['calibration_s']:.1f} s[/]", soft_wrap=True)
    if plot_file is not None:
        plot(results, cfg.out, plot_file)
    return results
