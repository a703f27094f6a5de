"""``trimix eval``: the paper's comparison on your tasks, models and language, resumable.

Every number is checked before a model loads, and the run folder is locked and its manifest compared
with this run's settings before any prediction is made (see :mod:`trimix_cpp.evaluation.rundir`), so
a mistake costs a second, not a run.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

import trimix_cpp as tm
from trimix_cpp.evaluation.metrics import ROUGE_TOKENIZERS
from trimix_cpp.evaluation.results import Results, build_results
from trimix_cpp.evaluation.rundir import RunDir, method_identity, model_identity, task_identity
from trimix_cpp.evaluation.runner import (
    GenerationSettings,
    Runner,
    SettingsError,
    Task,
    calibration_path,
    check_count,
    needed_roles,
    parse_methods,
    score_task,
)
from trimix_cpp.evaluation.tasks import (
    FittedItems,
    PromptSettings,
    TaskData,
    check_limit,
    load_spec,
    prompt_format,
)
from trimix_cpp.selection import parse_grid

from .common import err


def load_task_spec(spec: str, train: Path | None, settings: PromptSettings) -> TaskData:
    """``FILE.jsonl``, ``milic:ROOT:TASK:LANG[:SRC-TGT]``, ``belebele:FILE:LANG`` or ``sib200:FILE:LANG``
    (see :data:`trimix_cpp.evaluation.tasks.SPEC_HELP`)."""
    return load_spec(spec, train=train, settings=settings)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        console=console,
    )


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


def plot(results: Results, out_dir: Path, path: Path) -> None:
    """Per-task bars of every method, and the calibration PPL landscape of each task."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise tm.TrimixError("--plot needs matplotlib: pip install -e '.[plot]'") from None
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
        im = a_ax.imshow(cal["mean_nll"], cmap="viridis_r")  # NLL = log perplexity: readable over decades
        a_ax.set_xticks(range(len(cal["grid_beta"])), [f"{b:g}" for b in cal["grid_beta"]])
        a_ax.set_yticks(range(len(cal["grid_alpha"])), [f"{a:g}" for a in cal["grid_alpha"]])
        a_ax.set_xlabel("beta (small-cpt)")
        a_ax.set_ylabel("alpha (large-ins)")
        a_ax.set_title(f"{t}: prompt NLL per token (nats)", fontsize=9)
        fig.colorbar(im, ax=a_ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_eval(
    tasks: list[str],
    setup,
    *,
    methods: str,
    out: Path,
    train: Path | None,
    shots: int,
    limit: int | None,
    max_tokens: int,
    mc_mode: str,
    calibration_n: int,
    grid_alpha: str | None,
    grid_beta: str | None,
    plot_file: Path | None,
    options: tm.LoadOptions,
    rouge_tokenizer: str = "xlsum",
) -> Results:
    """Load the models once, run every method over every task (skipping what the run folder has),
    score, write and show the results."""
    check_limit(limit)
    check_count("--shots", shots, minimum=0)
    check_count("--calibration-n", calibration_n)
    settings = GenerationSettings(max_tokens=max_tokens, mc_mode=mc_mode)
    if rouge_tokenizer not in ROUGE_TOKENIZERS:
        raise SettingsError(f"--rouge-tokenizer is {' or '.join(ROUGE_TOKENIZERS)}, got {rouge_tokenizer!r}")
    if not tasks:
        raise SettingsError("no task to evaluate (give FILE.jsonl, milic:ROOT:TASK:LANG, ...)")
    ga, gb = parse_grid(grid_alpha), parse_grid(grid_beta)
    specs = parse_methods(methods, ga, gb)
    paths = setup.paths(needed_roles(specs), "evaluation")
    calibration_seed = 0
    # Tasks are read without the token budget (no model needed), so every spec, file and name is
    # checked before the run folder is made or a model loads; prompts are fitted to the budget later,
    # item by item, when the run reads them.
    loaded = [load_task_spec(t, train, PromptSettings(shots=shots)) for t in tasks]
    names = [d.task for d in loaded]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SettingsError(f"two tasks are named {twice[0]}: give each task once, or rename one file")
    for d in loaded:
        if not d.items:
            raise tm.TrimixError(f"task {d.task} has no items to evaluate")
    console = Console(stderr=True)
    task_scores, metrics, notes = {}, {}, {}
    with RunDir(out) as run:
        run.check(
            settings={
                "shots": shots,
                "max_tokens": settings.max_tokens,
                "mc_max_tokens": settings.mc_max_tokens,
                "mc_mode": settings.mc_mode,
                "stop": list(settings.stop),
                "n_ctx": options.n_ctx,
                "prompt_format": prompt_format(),
            },
            models={role: model_identity(p) for role, p in paths.items()},
            methods={
                m.name: method_identity(
                    m.fusion,
                    m.task_level,
                    grid_alpha=ga,
                    grid_beta=gb,
                    calibration_n=calibration_n,
                    calibration_seed=calibration_seed,
                )
                for m in specs
            },
            tasks={d.task: task_identity(d.files) for d in loaded},
        )
        run.save()
        with tm.Engine(paths, options) as engine:
            room = engine.n_ctx - max_tokens - 8
            if room < 16:
                raise tm.TrimixError(
                    f"a context of {engine.n_ctx} tokens leaves no room for prompts after -n {max_tokens}"
                )
            budget = PromptSettings(
                shots=shots,
                max_prompt=room,
                count_tokens=lambda text: len(engine.tokenize(text)),
            )
            runner = Runner(engine, out, settings, ga, gb, calibration_n, calibration_seed)
            try:
                for data in loaded:
                    _run_task(
                        runner,
                        data,
                        data.fitted(budget),
                        limit,
                        specs,
                        console,
                        task_scores,
                        metrics,
                        notes,
                        rouge_tokenizer,
                    )
            finally:
                runner.close()
        results = build_results([m.name for m in specs], task_scores, metrics, notes)
        results.write(out)
    show(results, Console())
    if plot_file is not None:
        plot(results, out, plot_file)
    return results


def _run_task(
    runner: Runner,
    data: TaskData,
    fitted: FittedItems,
    limit: int | None,
    specs: list,
    console: Console,
    task_scores: dict,
    metrics: dict,
    notes: dict,
    rouge_tokenizer: str,
) -> None:
    """Run one task's items under every method, then score them; results go into the three dicts.

    ``fitted`` is the task's items with prompts fitted to the context: the first ``limit`` are run,
    and per-task calibration draws its sample from all of them (fitting only the ones it draws).
    """
    for w in data.warnings:
        err.print(f"[yellow]warning:[/] {escape(str(w))}", soft_wrap=True)
    items = list(fitted[: len(data.head(limit))])
    task = Task(data.task, items, pool=fitted)
    concrete = runner.expand(task, specs)
    for w in fitted.warnings:
        err.print(f"[yellow]warning:[/] {escape(str(w))}", soft_wrap=True)
    shots_used = sorted({it.n_shots for it in items})
    task_notes = [f"in-context examples per prompt: {', '.join(map(str, shots_used))}"]
    cut = [it.cut_to for it in items if it.cut_to is not None]
    if cut:
        message = f"{len(cut)} of {len(items)} passages cut to {min(cut)}-{max(cut)} characters to fit the context"
        task_notes.append(message)
        err.print(f"[yellow]warning:[/] {task.name}: {escape(message)}", soft_wrap=True)
    with _progress(console) as bar:
        pid = bar.add_task(task.name, total=runner.pending(task, concrete), rate="")
        t_start, done = time.perf_counter(), 0
        for _ in runner.run(task, concrete):
            done += 1
            bar.update(pid, advance=1, rate=f"{done / (time.perf_counter() - t_start):.2f} it/s")
    names = [m.name for m in concrete]
    failed = sum(1 for it in items for name in names if "error" in runner.log.records.get((task.name, it.id, name), {}))
    if failed:
        message = f"{failed} predictions did not fit the context and count as no answer (raise --n-ctx)"
        task_notes.append(message)
        err.print(f"[yellow]warning:[/] {task.name}: {escape(message)}", soft_wrap=True)
    notes[task.name] = task_notes
    task_scores[task.name] = score_task(task, names, runner.log, rouge_tokenizer)
    metric = items[0].metric
    metrics[task.name] = f"{metric} ({rouge_tokenizer})" if metric == "rouge-l" else metric
