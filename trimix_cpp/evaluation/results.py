"""The results table of a run: task x method, averages, and gain over the best single model.

Computed from the predictions file alone, so an interrupted and resumed run reports exactly what a
run straight through would have.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .predict import SINGLE_NAMES, upper_bound, write_atomic


@dataclass
class Results:
    methods: list[str]
    tasks: list[str]
    scores: dict[str, dict[str, float]]  # task -> method -> metric
    metrics: dict[str, str]  # task -> metric name
    upper: dict[str, str] = field(default_factory=dict)  # task -> grid pair the oracle picked
    notes: dict[str, list[str]] = field(default_factory=dict)

    def average(self, method: str) -> float:
        vals = [self.scores[t][method] for t in self.tasks if method in self.scores[t]]
        return sum(vals) / len(vals) if len(vals) == len(self.tasks) and vals else math.nan

    def best_single(self, task: str) -> tuple[str, float] | None:
        singles = [(m, v) for m, v in self.scores[task].items() if m in SINGLE_NAMES]
        return max(singles, key=lambda kv: kv[1]) if singles else None

    def gain(self, method: str) -> float:
        """Relative gain (%) of the method's average over the average of each task's best single."""
        best = [self.best_single(t) for t in self.tasks]
        if any(b is None for b in best):
            return math.nan
        base = sum(b[1] for b in best) / len(best)
        avg = self.average(method)
        return (avg - base) / base * 100 if base and math.isfinite(avg) else math.nan

    def as_dict(self) -> dict[str, object]:
        return {
            "methods": self.methods,
            "tasks": {
                t: {
                    "metric": self.metrics[t],
                    "scores": self.scores[t],
                    "upper_bound_pair": self.upper.get(t),
                    "notes": self.notes.get(t, []),
                }
                for t in self.tasks
            },
            "average": {m: self.average(m) for m in self.methods},
            "gain_over_best_single_pct": {m: self.gain(m) for m in self.methods},
        }

    def markdown(self) -> str:
        head = (
            "| method | "
            + " | ".join(f"{t} ({self.metrics[t]})" for t in self.tasks)
            + " | avg | gain vs best single |"
        )
        lines = [head, "|" + "---|" * (len(self.tasks) + 3)]
        for m in self.methods:
            cells = [_fmt(self.scores[t].get(m)) for t in self.tasks]
            label = f"{m} (oracle)" if m == "upper-bound" else m
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {_fmt(self.average(m))} | {_pct(self.gain(m))} |")
        for t in self.tasks:
            for note in self.notes.get(t, []):
                lines.append(f"\n{t}: {note}")
        return "\n".join(lines) + "\n"

    def write(self, out_dir: Path) -> None:
        write_atomic(out_dir / "results.json", json.dumps(self.as_dict(), indent=2, ensure_ascii=False) + "\n")
        write_atomic(out_dir / "results.md", self.markdown())


def _fmt(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.2f}"


def _pct(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{v:+.1f}%"


def build_results(
    methods: Sequence[str],
    task_scores: Mapping[str, Mapping[str, float]],
    metrics: Mapping[str, str],
    notes: Mapping[str, list[str]] | None = None,
) -> Results:
    """Assemble the table; ``upper-bound`` becomes the best grid pair's score per task."""
    scores: dict[str, dict[str, float]] = {}
    upper: dict[str, str] = {}
    for task, per in task_scores.items():
        row = {m: v for m, v in per.items() if m in methods}
        if "upper-bound" in methods:
            best = upper_bound(per)
            if best is not None:
                upper[task], row["upper-bound"] = best
        scores[task] = row
    return Results(list(methods), list(task_scores), scores, dict(metrics), upper, dict(notes or {}))
