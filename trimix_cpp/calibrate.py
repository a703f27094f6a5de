"""Per-task calibration: one (alpha, beta) for a whole task, chosen from a sample of its prompts.

This is how the authors' evaluation code uses perplexity selection: draw a few dozen prompts of the
task (no labels needed), add up each pair's mean NLL per token over them, keep the best pair, and
run the whole task with it. The result is a small JSON file that ``trimix generate --weights-from``
reads back; it records the model files it was made for (name and size) and is refused for others.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .engine import Engine
from .errors import ContextOverflowError, TrimixError
from .finite import json_number, json_safe, perplexity
from .selection import SELECTION_ROLES, Selector, choose

FORMAT = "trimix-weights/1"


def read_prompts(path: str | Path, field: str = "prompt") -> list[str]:
    """Prompts from a JSONL file, one JSON object per line with a ``prompt`` field."""
    path = Path(path)
    if not path.is_file():
        raise TrimixError(f"prompts file not found: {path}")
    prompts = []
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
                record = json.loads(line.removeprefix("\ufeff") if lineno == 1 else line)
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                raise TrimixError(
                    f"{path}:{lineno}: not a JSON object in UTF-8 ({e.__class__.__name__}); "
                    "write one JSON object per line"
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise TrimixError(f'{path}:{lineno}: no string field "{field}" (each line needs {{"{field}": "..."}})')
            prompts.append(record[field])
    if not prompts:
        raise TrimixError(f"{path} has no prompts")
    return prompts


def sample_prompts(prompts: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` prompts drawn without replacement with a seeded generator (all of them if fewer)."""
    if n <= 0:
        raise TrimixError("{n} must be positive, got {got}", param="n", got=n)
    if n >= len(prompts):
        return list(prompts)
    return random.Random(seed).sample(list(prompts), n)


def check_output_path(path: str | Path, flag: str = "-o", example: str = "weights.json") -> None:
    """Refuse, before any model loads, an output path a result could not be written to (a
    calibration or an evaluation takes minutes, and finding out only at the end loses it)."""
    path = Path(path)
    if path.is_dir():
        raise TrimixError(f"{flag} {path} is a folder; give a file path such as {path / example}")
    folder = path.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise TrimixError(f"cannot write {path}: the folder {folder} {what} (create it, or choose another {flag})")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise TrimixError(f"cannot write {path}: the folder {folder} is not writable ({e.strerror or e})") from None


def model_fingerprint(paths: Mapping[str, str | Path]) -> dict[str, dict[str, object]]:
    """What a weights file remembers of each model: file name and size in bytes."""
    return {r: {"file": Path(p).name, "bytes": os.path.getsize(p)} for r, p in paths.items() if r in SELECTION_ROLES}


@dataclass
class Calibration:
    """One pair for a task: each grid pair's score averaged over the sampled prompts (mean NLL per
    token for ``ppl``, entropy of the first generated token for ``ent``) and the pair it picks."""

    strategy: str
    alphas: tuple[float, ...]
    betas: tuple[float, ...]
    scores: np.ndarray
    chosen: tuple[float, float]
    n_prompts: int
    models: dict[str, dict[str, object]]
    n_skipped: int = 0  # sampled prompts too long for the context
    n_short: int = 0  # sampled prompts of one token: no perplexity, so left out of a ``ppl`` mean

    @property
    def mean_nll(self) -> np.ndarray:
        return self.scores

    def as_dict(self) -> dict[str, object]:
        key = "nll" if self.strategy == "ppl" else "entropy"
        grid = []
        for i, a in enumerate(self.alphas):
            for j, b in enumerate(self.betas):
                v = float(self.scores[i, j])
                cell = {"alpha": a, "beta": b, key: json_number(v)}
                grid.append(cell | ({"ppl": json_number(perplexity(v))} if key == "nll" else {}))
        return {
            "format": FORMAT,
            "strategy": self.strategy,
            "chosen": {"alpha": self.chosen[0], "beta": self.chosen[1]},
            "grid_alpha": list(self.alphas),
            "grid_beta": list(self.betas),
            "scores": json_safe(self.scores.tolist()),
            "grid": grid,
            "n_prompts": self.n_prompts,
            "n_skipped": self.n_skipped,
            "n_short": self.n_short,
            "models": self.models,
        }

    def save(self, path: str | Path) -> None:
        """Write atomically, so an interrupted run never leaves half a weights file."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(self.as_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            tmp.replace(path)
        except OSError as e:
            raise TrimixError(f"cannot write {path}: {e.strerror or e} (choose another -o)") from None


def calibrate(
    engine: Engine,
    prompts: Sequence[str | np.ndarray],
    selectors: Selector | Sequence[Selector],
    paths: Mapping[str, str | Path],
    progress: Callable[[int], None] | None = None,
) -> dict[str, Calibration]:
    """Each selector's score of every pair averaged over ``prompts`` (one evaluation per prompt,
    shared by all the selectors), and the pair each picks, by strategy.

    This is how the authors' evaluation uses perplexity selection: one pair for the whole task from
    a few dozen of its prompts, no labels. A prompt too long for the context is skipped and counted.
    A one-token prompt predicts nothing, so it has no perplexity (a single selection falls back to
    the entropy of its next token): its entropy is not a mean NLL and would skew the ``ppl`` mean, so
    ``ppl`` skips it and counts it in ``n_short``; ``ent`` still uses it.
    """
    sels = [selectors] if isinstance(selectors, Selector) else list(selectors)
    if not sels:
        raise TrimixError("calibration needs a selection strategy (ppl or ent)")
    totals = {s: np.zeros((len(s.alphas), len(s.betas))) for s in sels}
    used = dict.fromkeys(sels, 0)
    short = dict.fromkeys(sels, 0)
    skipped = 0
    for k, prompt in enumerate(prompts):
        try:
            picked = engine.select_many(prompt, sels)
        except ContextOverflowError:
            skipped += 1
            continue
        for s in sels:
            if picked[s].strategy != s.strategy:  # a ppl selector that had to choose by entropy
                short[s] += 1
                continue
            totals[s] += picked[s].scores
            used[s] += 1
        if progress is not None:
            progress(k + 1)
    out: dict[str, Calibration] = {}
    for s in sels:
        if not used[s]:
            if short[s]:
                raise TrimixError(
                    "no calibration prompt has the two tokens a perplexity needs ({short} of one token, "
                    "{skipped} too long for the context): give longer prompts, or {strategy} ent",
                    param="strategy",
                    short=short[s],
                    skipped=skipped,
                )
            raise TrimixError("no calibration prompt fits the context (raise {n_ctx})", param="n_ctx")
        mean = totals[s] / used[s]
        out[s.strategy] = Calibration(
            strategy=s.strategy,
            alphas=s.alphas,
            betas=s.betas,
            scores=mean,
            chosen=choose(s.alphas, s.betas, mean),
            n_prompts=used[s],
            models=model_fingerprint(paths),
            n_skipped=skipped,
            n_short=short[s],
        )
    return out


def read_calibration(path: str | Path) -> Calibration:
    """A weights file as written by :meth:`Calibration.save` (for a run's per-task calibration).

    A file this version cannot read (written by an older one, or damaged) is a one-line error rather
    than a KeyError: the run folder it sits in was made with other code.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError(data.get("format"))
        return Calibration(
            strategy=data["strategy"],
            alphas=tuple(data["grid_alpha"]),
            betas=tuple(data["grid_beta"]),
            scores=np.asarray(data["scores"], dtype=np.float64),
            chosen=(float(data["chosen"]["alpha"]), float(data["chosen"]["beta"])),
            n_prompts=int(data["n_prompts"]),
            models=data["models"],
            n_skipped=int(data.get("n_skipped", 0)),
            n_short=int(data.get("n_short", 0)),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise TrimixError(
            "{path} is not a calibration file of format {format} (an older trimix wrote it, or it is damaged): "
            "delete it to calibrate again, or start a new run with another {out}",
            param="out",
            path=path,
            format=FORMAT,
        ) from None


def load_weights(path: str | Path, paths: Mapping[str, str | Path]) -> tuple[float, float]:
    """The (alpha, beta) of a weights file, after checking it was made for these model files."""
    path = Path(path)
    if not path.is_file():
        raise TrimixError(f"weights file not found: {path} (make one with trimix calibrate)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        alpha, beta = float(data["chosen"]["alpha"]), float(data["chosen"]["beta"])
        saved = data["models"]
    except (ValueError, KeyError, TypeError):
        raise TrimixError(f"{path} is not a trimix weights file (make one with trimix calibrate)") from None
    if data.get("format") != FORMAT:
        raise TrimixError(f"{path} has format {data.get('format')!r}, expected {FORMAT!r} (recalibrate)")
    current = model_fingerprint(paths)
    for role in SELECTION_ROLES:
        if saved.get(role) != current.get(role):
            raise TrimixError(
                f"{path} was calibrated for {role} = {saved.get(role)}, not {current.get(role)} "
                "(run trimix calibrate for these models)"
            )
    if not (math.isfinite(alpha) and math.isfinite(beta)):
        raise TrimixError(f"{path} holds non-finite weights (recalibrate)")
    return alpha, beta
