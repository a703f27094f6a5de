"""A whole ``trimix eval`` run: check everything, load the models once, run every task, score.

Every number and task file is checked before a model loads, and the run folder is locked and its
manifest compared with this run's settings before any prediction is made (see :mod:`.folder`), so
a mistake costs a second, not a run. The models are loaded with enough sequences for every method
of an item to decode together (one per method, the upper bound's grid pairs included) and a KV
cache that holds one prompt plus every method's answer.

What a person sees (warnings, progress) goes through a :class:`Reporter`, so the command line
decides how to show it and the library decides what happens.

Where items are predicted is a :class:`Backend`: the models loaded in this process
(:class:`LocalBackend`), or workers on a cluster (:mod:`.cluster`). Everything else (checks, the
run folder, prompt fitting, the calibration sample, writing, scoring) is this module's, whichever
backend predicts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from .._llama import MAX_SEQ
from ..engine import Engine
from ..errors import TrimixError
from ..loading import LoadOptions
from ..modelset import ModelSet
from ..selection import parse_grid
from ..speculative import MAX_DRAFT
from .folder import RunDir, method_identity, model_identity, task_identity
from .items import FittedItems, PromptSettings, TaskData, check_limit
from .metrics import ROUGE_TOKENIZERS, check_metric_available, make_rouge_tokenizer
from .predict import (
    Calibrator,
    GenerationSettings,
    MethodSpec,
    Runner,
    SettingsError,
    Task,
    check_count,
    needed_roles,
    parse_methods,
    score_task,
)
from .results import Results, build_results
from .tasks import load_spec
from .templates import prompt_format


class Reporter(Protocol):
    """Where a run's news goes: warnings, and progress per task."""

    def warning(self, message: str) -> None: ...

    def start(self, task: str, total: int) -> None: ...

    def advance(self, task: str) -> None: ...

    def finish(self, task: str) -> None: ...


class QuietReporter:
    """A reporter that keeps warnings and ignores progress (for scripts and tests)."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warning(self, message: str) -> None:
        self.warnings.append(message)

    def start(self, task: str, total: int) -> None:
        pass

    def advance(self, task: str) -> None:
        pass

    def finish(self, task: str) -> None:
        pass


@dataclass
class EvalConfig:
    """Everything a run depends on besides its task specs and models."""

    methods: str
    out: Path
    train: Path | None = None
    shots: int = 5
    limit: int | None = None
    max_tokens: int = 64
    mc_mode: str = "generate"
    calibration_n: int = 50
    calibration_seed: int = 0
    grid_alpha: str | Sequence[float] | None = None
    grid_beta: str | Sequence[float] | None = None
    rouge_tokenizer: str = "xlsum"
    draft: int = 0
    timings: dict[str, dict[str, float]] = field(default_factory=dict)


class Backend(Protocol):
    """Where a run's items are predicted, opened once the run folder is locked and its manifest saved.

    ``n_ctx`` is the loaded context (the prompt budget follows from it), ``count_tokens`` the
    tokenizer's count used to fit prompts; ``engine`` (models in this process) or ``calibrator``
    (elsewhere) computes per-task calibrations; ``run`` predicts a task's pending items and appends
    each new record to ``runner.log``, yielding it.
    """

    n_ctx: int
    engine: Engine | None
    calibrator: Calibrator | None

    def count_tokens(self, text: str) -> int: ...

    def run(self, runner: Runner, task: Task, methods: Sequence[MethodSpec]) -> Iterator[dict]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class RunnerSettings:
    """What a runner predicts with besides its models: a cluster worker builds its own runner from it."""

    generation: GenerationSettings
    grid_alpha: tuple[float, ...]
    grid_beta: tuple[float, ...]
    calibration_n: int
    calibration_seed: int
    draft: int

    def runner(self, engine: Engine | None, out: Path | None, calibrator: Calibrator | None = None) -> Runner:
        return Runner(
            engine,
            out,
            self.generation,
            self.grid_alpha,
            self.grid_beta,
            self.calibration_n,
            self.calibration_seed,
            self.draft,
            calibrator=calibrator,
        )


@dataclass(frozen=True)
class BackendSpec:
    """What every backend is opened with, whichever it is: the run's model files by role, the load
    options, the manifest's model entries (a remote worker checks its files against them), the
    runner's settings (a remote worker builds its own runner) and the reporter for what a person
    should know."""

    paths: Mapping[str, Path]
    options: LoadOptions
    models: Mapping[str, dict]
    settings: RunnerSettings
    report: Reporter | None = None


# How a backend is opened; ``LocalBackend`` is the default, :func:`.cluster.ray_backend` makes another.
OpenBackend = Callable[[BackendSpec], Backend]


class LocalBackend:
    """The models loaded in this process: items are predicted one after another, here."""

    calibrator = None

    def __init__(self, spec: BackendSpec) -> None:
        self.engine: Engine | None = Engine(spec.paths, spec.options)
        self.n_ctx = self.engine.n_ctx

    def count_tokens(self, text: str) -> int:
        assert self.engine is not None
        return len(self.engine.tokenize(text))

    def run(self, runner: Runner, task: Task, methods: Sequence[MethodSpec]) -> Iterator[dict]:
        return runner.run(task, methods)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def load_task_spec(spec: str, train: Path | None, settings: PromptSettings) -> TaskData:
    """``FILE.jsonl``, ``milic:ROOT:TASK:LANG[:SRC-TGT]``, ``belebele:FILE:LANG`` or ``sib200:FILE:LANG``
    (see :data:`trimix_cpp.evaluation.tasks.SPEC_HELP`)."""
    return load_spec(spec, train=train, settings=settings)


def batch_options(options: LoadOptions, specs: Sequence[MethodSpec], n_grid: int, max_tokens: int, draft: int):
    """Load options with a sequence for every concrete method of an item and room in one shared KV
    cache for one prompt plus every method's answer (and its draft): the methods of an item continue
    one prompt, which a shared cache holds once where separate caches would hold it per method."""
    n_methods = sum(n_grid if m.task_level == "upper-bound" else 1 for m in specs)
    n_seq = max(1, min(n_methods, MAX_SEQ - 1))
    cells = options.n_ctx + n_seq * (max_tokens + draft + 1)
    return replace(options, n_seq=n_seq, kv_cells=cells, isolated=False)


def run_evaluation(
    tasks: Sequence[str],
    modelset: ModelSet,
    options: LoadOptions,
    cfg: EvalConfig,
    report: Reporter,
    backend: OpenBackend = LocalBackend,
):
    """Load the models once, run every method over every task (skipping what the run folder has),
    score, and write the results; returns them. ``backend`` says where items are predicted (here by
    default; see :mod:`.cluster` for workers on a Ray cluster)."""
    check_limit(cfg.limit)
    check_count("shots", cfg.shots, minimum=0)
    check_count("calibration_n", cfg.calibration_n)
    if isinstance(cfg.draft, bool) or not isinstance(cfg.draft, int) or not 0 <= cfg.draft <= MAX_DRAFT:
        raise SettingsError(
            "{draft} must be a whole number from 0 (off) to {hi}, got {got!r}",
            param="draft",
            hi=MAX_DRAFT,
            got=cfg.draft,
        )
    settings = GenerationSettings(max_tokens=cfg.max_tokens, mc_mode=cfg.mc_mode)
    if cfg.rouge_tokenizer not in ROUGE_TOKENIZERS:
        raise SettingsError(
            "{rouge_tokenizer} is {choices}, got {got!r}",
            param="rouge_tokenizer",
            choices=" or ".join(ROUGE_TOKENIZERS),
            got=cfg.rouge_tokenizer,
        )
    if not tasks:
        raise SettingsError("no task to evaluate (give FILE.jsonl, milic:ROOT:TASK:LANG, ...)")
    ga, gb = parse_grid(cfg.grid_alpha), parse_grid(cfg.grid_beta)
    specs = parse_methods(cfg.methods, ga, gb)
    if cfg.draft and not any(m.drafts for m in specs):
        raise SettingsError(
            "{draft} lets the small models draft for the large one, but none of {methods} {chosen} has a large "
            "model and small-cpt (TriMix, Proxy Tuning do): use {draft} 0 or add such a method",
            param="draft",
            chosen=cfg.methods,
        )
    paths = modelset.paths(needed_roles(specs), "evaluation")
    # Tasks are read without the token budget (no model needed), so every spec, file and name is
    # checked before the run folder is made or a model loads; prompts are fitted to the budget later,
    # item by item, when the run reads them.
    loaded = [load_task_spec(t, cfg.train, PromptSettings(shots=cfg.shots)) for t in tasks]
    names = [d.task for d in loaded]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SettingsError(f"two tasks are named {twice[0]}: give each task once, or rename one file")
    for d in loaded:
        if not d.items:
            raise TrimixError(f"task {d.task} has no items to evaluate")
        check_metric_available(d.items[0].metric)
        if d.items[0].metric == "rouge-l":
            make_rouge_tokenizer(cfg.rouge_tokenizer)  # xlsum needs pyonmttok: say so before the run
    options = batch_options(options, specs, len(ga) * len(gb), settings.max_tokens, cfg.draft)
    task_scores: dict[str, dict[str, float]] = {}
    metrics: dict[str, str] = {}
    notes: dict[str, list[str]] = {}
    models = {role: model_identity(p) for role, p in paths.items()}
    with RunDir(cfg.out) as run:
        run.check(
            settings={
                "shots": cfg.shots,
                "max_tokens": settings.max_tokens,
                "mc_max_tokens": settings.mc_max_tokens,
                "mc_mode": settings.mc_mode,
                "stop": list(settings.stop),
                "n_ctx": options.n_ctx,
                "prompt_format": prompt_format(),
            },
            models=models,
            methods={
                m.name: method_identity(
                    m.fusion,
                    m.task_level,
                    grid_alpha=ga,
                    grid_beta=gb,
                    calibration_n=cfg.calibration_n,
                    calibration_seed=cfg.calibration_seed,
                )
                for m in specs
            },
            tasks={d.task: task_identity(d.files) for d in loaded},
        )
        run.save()
        rs = RunnerSettings(settings, tuple(ga), tuple(gb), cfg.calibration_n, cfg.calibration_seed, cfg.draft)
        where = backend(BackendSpec(paths, options, models, rs, report))
        try:
            room = where.n_ctx - settings.max_tokens - 8
            if room < 16:
                raise TrimixError(
                    f"a context of {where.n_ctx} tokens leaves no room for prompts after -n {settings.max_tokens}"
                )
            budget = PromptSettings(shots=cfg.shots, max_prompt=room, count_tokens=where.count_tokens)
            runner = rs.runner(where.engine, cfg.out, where.calibrator)
            try:
                for data in loaded:
                    t0 = time.perf_counter()
                    fitted = data.fitted(budget)
                    _run_task(where, runner, data, fitted, cfg, specs, report, task_scores, metrics, notes)
                    total = time.perf_counter() - t0
                    cal = runner.calibration_seconds.get(data.task, 0.0)
                    cfg.timings[data.task] = {"calibration_s": cal, "items_s": total - cal}
            finally:
                runner.close()
        finally:
            where.close()
        results = build_results([m.name for m in specs], task_scores, metrics, notes)
        results.write(cfg.out)
    return results


def _run_task(
    where: Backend,
    runner: Runner,
    data: TaskData,
    fitted: FittedItems,
    cfg: EvalConfig,
    specs: list[MethodSpec],
    report: Reporter,
    task_scores: dict,
    metrics: dict,
    notes: dict,
) -> None:
    """Run one task's items under every method, then score them; results go into the three dicts.

    ``fitted`` is the task's items with prompts fitted to the context: the first ``limit`` are run,
    and per-task calibration draws its sample from all of them (fitting only the ones it draws).
    """
    for w in data.warnings:
        report.warning(str(w))
    items = list(fitted[: len(data.head(cfg.limit))])
    task = Task(data.task, items, pool=fitted)
    concrete = runner.expand(task, specs)
    for w in fitted.warnings:
        report.warning(str(w))
    shots_used = sorted({it.n_shots for it in items})
    task_notes = [f"in-context examples per prompt: {', '.join(map(str, shots_used))}"]
    cut = [it.cut_to for it in items if it.cut_to is not None]
    if cut:
        message = f"{len(cut)} of {len(items)} passages cut to {min(cut)}-{max(cut)} characters to fit the context"
        task_notes.append(message)
        report.warning(f"{task.name}: {message}")
    report.start(task.name, runner.pending(task, concrete))
    for _ in where.run(runner, task, concrete):
        report.advance(task.name)
    report.finish(task.name)
    names = [m.name for m in concrete]
    errors = [runner.log.records.get((task.name, it.id, name), {}).get("error") for it in items for name in names]
    too_long = sum(1 for e in errors if e and "context holds" in e)
    failed = sum(1 for e in errors if e) - too_long
    for count, why in (
        (too_long, "did not fit the context and count as no answer (raise --n-ctx)"),
        (failed, "failed (see their error in predictions.jsonl) and count as no answer"),
    ):
        if count:
            message = f"{count} predictions {why}"
            task_notes.append(message)
            report.warning(f"{task.name}: {message}")
    notes[task.name] = task_notes
    task_scores[task.name] = score_task(task, names, runner.log, cfg.rouge_tokenizer)
    metric = items[0].metric
    metrics[task.name] = f"{metric} ({cfg.rouge_tokenizer})" if metric == "rouge-l" else metric


__all__ = [
    "Backend",
    "BackendSpec",
    "EvalConfig",
    "LocalBackend",
    "QuietReporter",
    "Reporter",
    "Results",
    "RunnerSettings",
    "batch_options",
    "load_task_spec",
    "run_evaluation",
]
