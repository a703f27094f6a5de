"""Running every method over a task's items, resumably, and scoring the predictions.

A run is a folder. Each prediction is appended to ``predictions.jsonl`` (and flushed to disk) the
moment it exists, keyed by (task, item id, method); rerunning the same command reads that file and
skips what is done, so Ctrl-C or a crash loses at most the item in flight. Results are computed from
the predictions alone and written atomically. What else a prediction depends on (models, settings,
task files) is the run folder's manifest, and one process at a time writes to a folder: see
:mod:`.rundir`. An item whose prompt does not fit the context is recorded with an ``error`` and an
empty output (no answer) instead of stopping the run.

Methods: each single model (``large-ins``, ``small-cpt``, ``small-base``), ``proxy``, ``contrastive``,
fixed TriMix weights (``trimix@A:B``), TriMix with per-prompt selection (``trimix-ppl``,
``trimix-ent``), TriMix with one pair per task from a calibration sample of the task's own prompts
(``trimix-ppl-task``, ``trimix-ent-task``: no labels), and ``upper-bound``: every grid pair is run and the best pair per
task *by the task metric* is reported. That last one looks at the labels: it is an oracle, a ceiling
for the label-free choices, not a method.
"""

from __future__ import annotations

import json
import math
import os
import random
import string
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..engine import Engine
from ..errors import ContextOverflowError, TrimixError
from ..fusion import LARGE_BASE, LARGE_INS, ROLES, SMALL_BASE, SMALL_CPT, FusionPlan, plan
from ..selection import DEFAULT_GRID, SELECTION_ROLES, Selector, choose
from .metrics import ROUGE_TOKENIZERS, score_outputs
from .rundir import read_predictions

SINGLE_NAMES = {"large-ins": LARGE_INS, "small-cpt": SMALL_CPT, "small-base": SMALL_BASE, "large-base": LARGE_BASE}
DEFAULT_METHODS = (
    "large-ins,small-cpt,small-base,proxy,contrastive,trimix-ppl,trimix-ent,trimix-ppl-task,trimix-ent-task,upper-bound"
)


class EvalItem(Protocol):
    """What the runner needs of a task item (see :mod:`trimix_cpp.evaluation.tasks`)."""

    id: str
    prompt: str
    gold: str
    options: Sequence[str] | None
    kind: str  # "generate" | "choice" | "math"


@dataclass(frozen=True)
class MethodSpec:
    """One column of the results table. ``fusion`` is fixed weights or a per-prompt selector;
    ``task_level`` methods get their weights from the whole task before any item runs."""

    name: str
    fusion: FusionPlan | Selector | None = None
    task_level: str | None = None  # "ppl-task" | "ent-task" | "upper-bound"

    @property
    def roles(self) -> tuple[str, ...]:
        if isinstance(self.fusion, FusionPlan):
            return self.fusion.roles
        return SELECTION_ROLES


def parse_methods(spec: str, grid_alpha: Sequence[float] = DEFAULT_GRID, grid_beta: Sequence[float] = DEFAULT_GRID):
    """The ``--methods`` list, in order, as :class:`MethodSpec` objects."""
    out: list[MethodSpec] = []
    for name in (x.strip() for x in spec.split(",") if x.strip()):
        if name in SINGLE_NAMES:
            out.append(MethodSpec(name, plan("single", role=SINGLE_NAMES[name])))
        elif name in ("proxy", "contrastive"):
            out.append(MethodSpec(name, plan(name)))
        elif name.startswith("trimix@"):
            try:
                a, b = (float(x) for x in name[len("trimix@") :].split(":"))
            except ValueError:
                raise TrimixError(f"write fixed TriMix weights as trimix@ALPHA:BETA, got {name!r}") from None
            out.append(MethodSpec(name, plan("trimix", alpha=a, beta=b)))
        elif name in ("trimix-ppl", "trimix-ent"):
            out.append(MethodSpec(name, Selector(name.split("-")[1], tuple(grid_alpha), tuple(grid_beta))))
        elif name in ("trimix-ppl-task", "trimix-ent-task"):
            out.append(MethodSpec(name, task_level=name.removeprefix("trimix-")))
        elif name == "upper-bound":
            out.append(MethodSpec(name, task_level="upper-bound"))
        else:
            raise TrimixError(
                f"unknown method {name!r} (use large-ins, small-cpt, small-base, proxy, contrastive, trimix@A:B, "
                "trimix-ppl, trimix-ent, trimix-ppl-task, trimix-ent-task, upper-bound)"
            )
    if not out:
        raise TrimixError("--methods is empty")
    return out


class PredictionLog:
    """Append-only JSONL of predictions; the record of what a run has done."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # A last record cut short by a crash is dropped (its item runs again); any other line that is
        # not a prediction is an error (see rundir.read_predictions).
        self.records: dict[tuple[str, str, str], dict] = read_predictions(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = path.open("a", encoding="utf-8")

    def done(self, task: str, item_id: str, method: str) -> bool:
        return (task, item_id, method) in self.records

    def append(self, rec: dict) -> None:
        self._handle.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.records[(rec["task"], rec["id"], rec["method"])] = rec

    def close(self) -> None:
        self._handle.close()


class SettingsError(TrimixError):
    """An evaluation setting out of its range (a count below 1, an unknown mode)."""


def check_count(flag: str, value: object, minimum: int = 1) -> None:
    """A count such as ``--max-tokens`` or ``--calibration-n`` must be a whole number >= ``minimum``:
    a 0 or a negative one would silently mean something else (nothing, or a division by zero)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SettingsError(f"{flag} must be a whole number, {minimum} or more, got {value!r}")


@dataclass
class GenerationSettings:
    max_tokens: int = 64
    stop: tuple[str, ...] = ("\n",)
    mc_max_tokens: int = 2
    mc_mode: str = "generate"  # or "score": rank options by fused log-likelihood

    def __post_init__(self) -> None:
        check_count("--max-tokens", self.max_tokens)
        check_count("the multiple-choice answer length", self.mc_max_tokens)
        if self.mc_mode not in ("generate", "score"):
            raise SettingsError(f"--mc-mode is generate or score, got {self.mc_mode!r}")
        self.stop = tuple(self.stop)


@dataclass
class Task:
    """A task as the runner sees it: a name (with its language) and the items to run.

    ``pool`` is every item of the task, when ``items`` is only the first few: per-task calibration
    samples its prompts from the pool, so that evaluating more items later (a higher ``--limit``)
    keeps the same calibrated pair.
    """

    name: str
    items: Sequence[EvalItem]
    pool: Sequence[EvalItem] | None = None


def calibration_path(out_dir: Path, task: str) -> Path:
    """Where a run keeps a task's calibrated pair and its landscape."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in task)
    return out_dir / f"calibration-{safe}.json"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


@dataclass
class Runner:
    """Runs methods over tasks with one loaded :class:`Engine` (models load once per run)."""

    engine: Engine
    out_dir: Path
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    grid_alpha: tuple[float, ...] = DEFAULT_GRID
    grid_beta: tuple[float, ...] = DEFAULT_GRID
    calibration_n: int = 50
    calibration_seed: int = 0

    def __post_init__(self) -> None:
        check_count("--calibration-n", self.calibration_n)
        check_count("the calibration seed", self.calibration_seed, minimum=0)
        self.log = PredictionLog(self.out_dir / "predictions.jsonl")

    def close(self) -> None:
        self.log.close()

    # -- planning ---------------------------------------------------------------------------------

    def expand(self, task: Task, methods: Sequence[MethodSpec]) -> list[MethodSpec]:
        """Concrete per-item methods: task-level ones become fixed weights (calibrated, or the grid)."""
        out: list[MethodSpec] = []
        for m in methods:
            if m.task_level in ("ppl-task", "ent-task"):
                a, b = self.calibrate(task, m.task_level.split("-")[0])
                out.append(MethodSpec(m.name, plan("trimix", alpha=a, beta=b)))
            elif m.task_level == "upper-bound":
                for a in self.grid_alpha:
                    for b in self.grid_beta:
                        name = f"trimix@{a:g}:{b:g}"
                        if all(x.name != name for x in out):
                            out.append(MethodSpec(name, plan("trimix", alpha=a, beta=b)))
            else:
                out.append(m)
        return out

    def calibrate(self, task: Task, strategy: str = "ppl") -> tuple[float, float]:
        """One pair for the task: the lowest mean prompt NLL (``ppl``) or mean first-token entropy
        (``ent``) over a seeded sample of its prompts (no labels), remembered in the run folder so a
        resumed run uses the same pair."""
        path = calibration_path(self.out_dir, task.name if strategy == "ppl" else f"{task.name}-{strategy}")
        if path.exists():
            saved = json.loads(path.read_text(encoding="utf-8"))
            return float(saved["alpha"]), float(saved["beta"])
        pool = task.items if task.pool is None else task.pool
        # Positions drawn exactly as random.sample draws from the prompts themselves; only the drawn
        # items are read, so a pool may build its prompts on demand.
        picked = random.Random(self.calibration_seed).sample(range(len(pool)), min(self.calibration_n, len(pool)))
        selector = Selector(strategy, self.grid_alpha, self.grid_beta)
        scores = []
        for i in picked:
            try:
                scores.append(self.engine.select(pool[i].prompt, selector).scores)
            except ContextOverflowError:
                continue  # one prompt too long for the context: the others calibrate
        if not scores:
            raise TrimixError(f"no calibration prompt of {task.name} fits the context (raise --n-ctx)")
        mean_nll = sum(scores) / len(scores)
        a, b = choose(selector.alphas, selector.betas, mean_nll)
        record = {
            "alpha": a,
            "beta": b,
            "n_prompts": len(scores),
            "n_too_long": len(picked) - len(scores),
            "grid_alpha": list(selector.alphas),
            "grid_beta": list(selector.betas),
            "strategy": strategy,
            "mean_nll" if strategy == "ppl" else "mean_entropy": mean_nll.tolist(),
        }
        write_atomic(path, json.dumps(record) + "\n")
        return a, b

    # -- running ----------------------------------------------------------------------------------

    def pending(self, task: Task, methods: Sequence[MethodSpec]) -> int:
        return sum(1 for m in methods for it in task.items if not self.log.done(task.name, it.id, m.name))

    def run(self, task: Task, methods: Sequence[MethodSpec]) -> Iterator[dict]:
        """Predict every (item, method) not yet in the log; yields each new record."""
        for m in methods:
            for it in task.items:
                if self.log.done(task.name, it.id, m.name):
                    continue
                try:
                    rec = self.predict(task, it, m)
                except ContextOverflowError as e:
                    # one item too long for the context: no answer for it, and the run goes on
                    rec = {"task": task.name, "id": it.id, "method": m.name, "output": "", "error": str(e)}
                self.log.append(rec)
                yield rec

    def predict(self, task: Task, item: EvalItem, method: MethodSpec) -> dict:
        s = self.settings
        t0 = time.perf_counter()
        selection = None
        if item.kind == "choice" and s.mc_mode == "score":
            output, weights, selection = self._score_options(item, method)
        else:
            max_tokens = s.mc_max_tokens if item.kind == "choice" else s.max_tokens
            gen = self.engine.generate(item.prompt, method.fusion, max_tokens=max_tokens, stop=list(s.stop)).run()
            output, weights = gen.text, gen.fusion.weights
            if gen.selection is not None:
                selection = {"alpha": gen.selection.chosen[0], "beta": gen.selection.chosen[1]}
        rec = {
            "task": task.name,
            "id": item.id,
            "method": method.name,
            "output": output,
            "weights": weights,
            "seconds": round(time.perf_counter() - t0, 4),
        }
        if selection:
            rec["selected"] = selection
        return rec

    def _score_options(self, item: EvalItem, method: MethodSpec) -> tuple[str, dict, dict | None]:
        """Multiple choice by likelihood: the option whose text the fused model finds most likely
        after the prompt (mean NLL per token), answered as its letter."""
        fusion = method.fusion
        selection = None
        if isinstance(fusion, Selector):
            sel = self.engine.select(item.prompt, fusion)
            fusion = plan("trimix", alpha=sel.chosen[0], beta=sel.chosen[1])
            selection = {"alpha": sel.chosen[0], "beta": sel.chosen[1]}
        assert isinstance(fusion, FusionPlan)
        best, best_nll = 0, math.inf
        for k, option in enumerate(item.options or []):
            nll = self.engine.continuation_nll(item.prompt, " " + option, fusion)
            if nll < best_nll:
                best, best_nll = k, nll
        return string.ascii_uppercase[best], fusion.weights, selection


def needed_roles(methods: Sequence[MethodSpec]) -> tuple[str, ...]:
    used = set()
    for m in methods:
        used |= set(m.roles)
    return tuple(r for r in ROLES if r in used)


def score_task(
    task: Task, method_names: Sequence[str], log: PredictionLog, rouge_tokenizer: str = "xlsum"
) -> dict[str, float]:
    """The task metric of each method, over the items it has predictions for (ROUGE-L with the
    tokenizer named ``rouge_tokenizer``)."""
    if rouge_tokenizer not in ROUGE_TOKENIZERS:
        raise SettingsError(f"--rouge-tokenizer is {' or '.join(ROUGE_TOKENIZERS)}, got {rouge_tokenizer!r}")
    out: dict[str, float] = {}
    for name in method_names:
        items, outputs = [], []
        for it in task.items:
            rec = log.records.get((task.name, it.id, name))
            if rec is not None:
                items.append(it)
                outputs.append(rec["output"])
        if items:
            out[name] = score_outputs(items, outputs, rouge_tokenizer)
    return out


def upper_bound(scores: Mapping[str, float]) -> tuple[str, float] | None:
    """The grid pair with the best metric (the oracle), ties to the first pair in grid order."""
    grid = [(k, v) for k, v in scores.items() if k.startswith("trimix@")]
    if not grid:
        return None
    return max(grid, key=lambda kv: kv[1])
