"""Running every method over a task's items, resumably, and scoring the predictions.

A run is a folder. Each prediction is appended to ``predictions.jsonl`` (and flushed to disk) the
moment it exists, keyed by (task, item id, method); rerunning the same command reads that file and
skips what is done, so Ctrl-C or a crash loses at most the item in flight. Results are computed from
the predictions alone and written atomically. What else a prediction depends on (models, settings,
task files) is the run folder's manifest, and one process at a time writes to a folder: see
:mod:`.folder`. An item whose prompt does not fit the context is recorded with an ``error`` and an
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
import os
import random
import string
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..calibrate import Calibration, read_calibration
from ..calibrate import calibrate as calibrate_prompts
from ..engine import Engine, SeqSpec
from ..errors import ContextOverflowError, TrimixError, flag
from ..fusion import LARGE_BASE, LARGE_INS, ROLES, SMALL_BASE, SMALL_CPT, FusionPlan, plan
from ..methods import MethodChoice, resolve_fusion
from ..selection import DEFAULT_GRID, SELECTION_ROLES, Selector
from ..speculative import draft_plan
from .folder import read_predictions
from .metrics import ROUGE_TOKENIZERS, score_outputs

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

    @property
    def drafts(self) -> bool:
        """Whether ``--draft`` applies (task-level methods become TriMix plans, which draft)."""
        return self.task_level is not None or _drafts(self.fusion)


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
        raise TrimixError("{methods} is empty", param="methods")
    return out


def perplexity_methods(spec: str, grid: MethodChoice = MethodChoice()) -> tuple[dict[str, FusionPlan], Selector | None]:
    """What ``trimix ppl --methods`` scores: ``large-ins,small-cpt,proxy,contrastive,trimix@0.1:0.9,
    trimix-grid`` -> named fixed plans (the evaluation's method names; only fixed-weight ones apply),
    and, for ``trimix-grid``, the grid whose every pair is scored (the best pair is chosen on the text):
    ``grid``'s ``grid_alpha``, ``grid_beta`` and ``max_logits_mib``, as PPL selection takes them."""
    items = [x.strip() for x in spec.split(",") if x.strip()]
    want_grid = "trimix-grid" in items
    rest = [x for x in items if x != "trimix-grid"]
    plans: dict[str, FusionPlan] = {}
    for m in parse_methods(",".join(rest)) if rest else []:
        if not isinstance(m.fusion, FusionPlan):
            raise TrimixError(f"{m.name} picks weights per prompt or per task; for perplexity use trimix-grid")
        plans[m.name] = m.fusion
    if not plans and not want_grid:
        raise TrimixError("--methods is empty")
    if not want_grid:
        if grid.grid_alpha is not None or grid.grid_beta is not None:
            raise TrimixError("--grid-alpha/--grid-beta apply to trimix-grid, which --methods does not list")
        return plans, None
    choice = MethodChoice(
        select="ppl", grid_alpha=grid.grid_alpha, grid_beta=grid.grid_beta, max_logits_mib=grid.max_logits_mib
    )
    selector = resolve_fusion(choice)
    assert isinstance(selector, Selector)
    return plans, selector


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


def check_count(name: str, value: object, minimum: int = 1) -> None:
    """A count such as ``max_tokens`` or ``calibration_n`` must be a whole number >= ``minimum``:
    a 0 or a negative one would silently mean something else (nothing, or a division by zero).
    ``name`` is the parameter, or a phrase for a count that no parameter sets."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        param = name if name.isidentifier() else None
        raise SettingsError(
            ("{param}" if param else "{what}") + " must be a whole number, {minimum} or more, got {got!r}",
            param=param,
            what=name,
            minimum=minimum,
            got=value,
        )


@dataclass
class GenerationSettings:
    max_tokens: int = 64
    stop: tuple[str, ...] = ("\n",)
    mc_max_tokens: int = 2
    mc_mode: str = "generate"  # or "score": rank options by fused log-likelihood

    def __post_init__(self) -> None:
        check_count("max_tokens", self.max_tokens)
        check_count("the multiple-choice answer length", self.mc_max_tokens)
        if self.mc_mode not in ("generate", "score"):
            raise SettingsError("{mc_mode} is generate or score, got {got!r}", param="mc_mode", got=self.mc_mode)
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


# Computes per-task calibrations somewhere else than this process's engine (a cluster worker):
# (prompts, selectors) -> the calibration per strategy, as :func:`trimix_cpp.calibrate.calibrate` returns.
Calibrator = Callable[[Sequence[str], Sequence[Selector]], dict[str, Calibration]]


@dataclass
class Runner:
    """Runs methods over tasks with one loaded :class:`Engine` (models load once per run).

    Per item, every pending method runs from one evaluation of the prompt in each model: the
    per-prompt selections (PPL and ENT) are read off that pass, the prompt's KV cells are shared by
    one sequence per method, and all methods generate together as one batch (methods that land on
    the same weights, such as ``trimix-ppl`` and the grid pair it picks, share one sequence).
    Likelihood-scored multiple choice scores every option under every method from that one pass.

    Two other shapes serve a cluster run (:mod:`.cluster`), so that it runs this same code: a
    worker's runner has an engine and no ``out_dir`` (it only predicts items: :meth:`item_records`;
    the driver writes), and the driver's runner has an ``out_dir`` and no engine, with a
    ``calibrator`` that asks a worker for per-task calibrations.
    """

    engine: Engine | None
    out_dir: Path | None
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    grid_alpha: tuple[float, ...] = DEFAULT_GRID
    grid_beta: tuple[float, ...] = DEFAULT_GRID
    calibration_n: int = 50
    calibration_seed: int = 0
    draft: int = 0
    calibration_seconds: dict[str, float] = field(default_factory=dict)
    calibrator: Calibrator | None = None

    def __post_init__(self) -> None:
        check_count("calibration_n", self.calibration_n)
        check_count("the calibration seed", self.calibration_seed, minimum=0)
        self._log = PredictionLog(self.out_dir / "predictions.jsonl") if self.out_dir is not None else None

    @property
    def log(self) -> PredictionLog:
        if self._log is None:
            raise TrimixError("this runner only predicts items (it has no run folder)")
        return self._log

    def close(self) -> None:
        if self._log is not None:
            self._log.close()

    # -- planning ---------------------------------------------------------------------------------

    def expand(self, task: Task, methods: Sequence[MethodSpec]) -> list[MethodSpec]:
        """Concrete per-item methods: task-level ones become fixed weights (calibrated, or the grid)."""
        wanted = [m.task_level.split("-")[0] for m in methods if m.task_level in ("ppl-task", "ent-task")]
        calibrated = self.calibrate(task, wanted) if wanted else {}
        out: list[MethodSpec] = []
        for m in methods:
            if m.task_level in ("ppl-task", "ent-task"):
                a, b = calibrated[m.task_level.split("-")[0]]
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

    def calibrate(self, task: Task, strategies: Sequence[str] = ("ppl",)) -> dict[str, tuple[float, float]]:
        """One pair per strategy for the task: the lowest mean prompt NLL (``ppl``) or mean first-token
        entropy (``ent``) over a seeded sample of its prompts (no labels), every strategy from the same
        one evaluation per prompt, remembered in the run folder (as weights files ``trimix generate
        --weights-from`` reads) so a resumed run uses the same pairs."""
        if self.out_dir is None:
            raise TrimixError("per-task calibration needs a run folder")
        out: dict[str, tuple[float, float]] = {}
        missing = []
        for strategy in dict.fromkeys(strategies):
            path = calibration_path(self.out_dir, task.name if strategy == "ppl" else f"{task.name}-{strategy}")
            if path.exists():
                out[strategy] = read_calibration(path).chosen
            else:
                missing.append(strategy)
        if not missing:
            return out
        pool = task.items if task.pool is None else task.pool
        # Positions drawn exactly as random.sample draws from the prompts themselves; only the drawn
        # items are read, so a pool may build its prompts on demand.
        picked = random.Random(self.calibration_seed).sample(range(len(pool)), min(self.calibration_n, len(pool)))
        selectors = [Selector(s, self.grid_alpha, self.grid_beta) for s in missing]
        t0 = time.perf_counter()
        try:
            found = self.calibrate_prompts([pool[i].prompt for i in picked], selectors)
        except TrimixError as e:
            raise TrimixError("{task}: {error}", param=e.param, task=task.name, error=e) from None
        self.calibration_seconds[task.name] = self.calibration_seconds.get(task.name, 0.0) + time.perf_counter() - t0
        for strategy, cal in found.items():
            cal.save(calibration_path(self.out_dir, task.name if strategy == "ppl" else f"{task.name}-{strategy}"))
            out[strategy] = cal.chosen
        return out

    def calibrate_prompts(self, prompts: Sequence[str], selectors: Sequence[Selector]) -> dict[str, Calibration]:
        """Each selector's calibration over ``prompts``: with this runner's engine, or its calibrator."""
        if self.calibrator is not None:
            return self.calibrator(prompts, selectors)
        engine = self._engine()
        return calibrate_prompts(engine, prompts, selectors, {r: m.path for r, m in engine.models.items()})

    def _engine(self) -> Engine:
        if self.engine is None:
            raise TrimixError("this runner has no models loaded (its items are predicted elsewhere)")
        return self.engine

    # -- running ----------------------------------------------------------------------------------

    def todo(self, task: Task, item: EvalItem, methods: Sequence[MethodSpec]) -> list[MethodSpec]:
        """The methods whose prediction for ``item`` the log does not hold yet (what a resumed run,
        local or on a cluster, still has to do)."""
        return [m for m in methods if not self.log.done(task.name, item.id, m.name)]

    def pending(self, task: Task, methods: Sequence[MethodSpec]) -> int:
        return sum(len(self.todo(task, it, methods)) for it in task.items)

    def run(self, task: Task, methods: Sequence[MethodSpec]) -> Iterator[dict]:
        """Predict every (item, method) not yet in the log, item by item; yields each new record."""
        for it in task.items:
            todo = self.todo(task, it, methods)
            if not todo:
                continue
            for rec in self.item_records(task, it, todo):
                self.log.append(rec)
                yield rec

    def item_records(self, task: Task, item: EvalItem, methods: Sequence[MethodSpec]) -> list[dict]:
        """The records of one item under ``methods``, as the run folder keeps them: what a local run
        and a cluster worker both compute for an item (so their predictions agree by construction)."""
        try:
            return self.predict_item(task, item, methods)
        except ContextOverflowError as e:
            # one item too long for the context: no answer for it, and the run goes on
            return [
                {"task": task.name, "id": item.id, "method": m.name, "output": "", "error": e.render(flag)}
                for m in methods
            ]

    def predict_item(self, task: Task, item: EvalItem, methods: Sequence[MethodSpec]) -> list[dict]:
        """Every method's prediction for one item, from one evaluation of its prompt."""
        s = self.settings
        engine = self._engine()
        t0 = time.perf_counter()
        prompt = engine.tokenize(item.prompt)
        if item.kind == "choice" and s.mc_mode == "score":
            outputs = self._score_options(prompt, item, methods)
        else:
            max_tokens = s.mc_max_tokens if item.kind == "choice" else s.max_tokens
            specs = [
                SeqSpec(
                    m.fusion,
                    max_tokens=max_tokens,
                    stop=tuple(s.stop),
                    draft=self.draft if _drafts(m.fusion) else 0,
                )
                for m in methods
            ]
            gens = engine.generate_many(prompt, specs)
            engine.run(gens)
            outputs = []
            for g in gens:
                sel = g.selection
                chosen = {"alpha": sel.chosen[0], "beta": sel.chosen[1]} if sel is not None else None
                error = str(g.error) if g.error is not None else None
                outputs.append((g.text, g.fusion.weights if isinstance(g.fusion, FusionPlan) else {}, chosen, error))
        seconds = round(time.perf_counter() - t0, 4)
        records = []
        for m, (output, weights, chosen, error) in zip(methods, outputs):
            rec = {
                "task": task.name,
                "id": item.id,
                "method": m.name,
                "output": output,
                "weights": weights,
                "seconds": seconds,
                "batch": len(methods),
            }
            if chosen:
                rec["selected"] = chosen
            if error:
                rec["error"] = error
            records.append(rec)
        return records

    def _score_options(
        self, prompt, item: EvalItem, methods: Sequence[MethodSpec]
    ) -> list[tuple[str, dict, dict | None, str | None]]:
        """Multiple choice by likelihood: the option whose text the fused model finds most likely
        after the prompt (mean NLL per token), answered as its letter; every method from one pass."""
        plans = {m.name: m.fusion for m in methods}
        nlls, selections = self._engine().option_nlls(prompt, [" " + o for o in item.options or []], plans)
        out = []
        for m in methods:
            scores = nlls[m.name]
            best = min(range(len(scores)), key=lambda k: (scores[k], k)) if scores else 0
            sel = selections.get(m.name)
            if sel is not None:
                fusion = sel.plan()
                chosen = {"alpha": sel.chosen[0], "beta": sel.chosen[1]}
            else:
                fusion, chosen = m.fusion, None
            out.append((string.ascii_uppercase[best], fusion.weights, chosen, None))
        return out


def _drafts(fusion: FusionPlan | Selector | None) -> bool:
    """Whether speculative decoding applies to a method (it needs a large and a small-cpt model)."""
    if isinstance(fusion, Selector):
        return True
    return fusion is not None and draft_plan(fusion) is not None


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
        raise SettingsError(
            "{rouge_tokenizer} is {choices}, got {got!r}",
            param="rouge_tokenizer",
            choices=" or ".join(ROUGE_TOKENIZERS),
            got=rouge_tokenizer,
        )
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
