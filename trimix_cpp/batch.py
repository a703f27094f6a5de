"""Many prompts in one command: a batch file in, one JSON object per prompt out, in input order.

A batch file is either plain text, one prompt per line, or JSONL (``.jsonl``), one object per line
with a ``prompt`` and, optionally, settings of its own that override the command's: ``max_tokens``,
``temperature``, ``top_k``, ``top_p``, ``min_p``, ``seed``, ``repeat_penalty``, ``repeat_last_n``,
``frequency_penalty``, ``presence_penalty``, ``logprobs``, ``stop``, ``method``, ``alpha``, ``beta``,
``gamma``, ``role``, ``select`` and ``draft``. Every prompt is queued on the engine at once; up to
``--parallel`` of them decode side by side and the others start as sequences free up. A line that
cannot run (not JSON, no prompt, a setting out of range, a prompt longer than the context) gets one
error object naming its line, and the other lines still run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from .engine import Engine
from .errors import TrimixError, flag
from .generation import Generation, SeqSpec, check_logprobs
from .methods import SAMPLING_FIELDS, MethodChoice, resolve_fusion, sampling_params

SETTINGS = {
    "max_tokens": int,
    "temperature": (int, float),
    "top_k": int,
    "top_p": (int, float),
    "min_p": (int, float),
    "seed": int,
    "repeat_penalty": (int, float),
    "repeat_last_n": int,
    "frequency_penalty": (int, float),
    "presence_penalty": (int, float),
    "logprobs": int,
    "stop": (str, list),
    "method": str,
    "alpha": (int, float),
    "beta": (int, float),
    "gamma": (int, float),
    "role": str,
    "select": str,
    "draft": int,
}


@dataclass
class BatchLine:
    """One line of a batch file: its number, its prompt and settings, or why it cannot run."""

    line: int
    prompt: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def read_batch(path: str | Path, text: str | None = None) -> list[BatchLine]:
    """The lines of a batch file (``text`` instead of reading ``path``, for stdin)."""
    path = Path(path)
    if text is None:
        if not path.is_file():
            raise TrimixError(f"batch file not found: {path}")
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TrimixError(
                f"batch file {path} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
                "save it as UTF-8"
            ) from None
    # A byte-order mark (what some editors write first) is not part of the first prompt.
    text = text.removeprefix("\ufeff")
    jsonl = path.suffix == ".jsonl"
    out: list[BatchLine] = []
    for n, raw in enumerate(text.split("\n"), start=1):
        raw = raw.removesuffix("\r")
        if not raw.strip():
            continue
        out.append(_parse_json_line(n, raw, path) if jsonl else BatchLine(n, raw))
    if not out:
        raise TrimixError(f"batch file {path} has no prompts (one prompt per line, or JSONL objects with a prompt)")
    return out


def _parse_json_line(n: int, raw: str, path: Path) -> BatchLine:
    where = f"{path.name}:{n}"
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        return BatchLine(n, error=f"{where}: not valid JSON ({e.msg} at column {e.colno})")
    except RecursionError:  # Python's parser recurses once per nested array or object
        return BatchLine(n, error=f"{where}: JSON nested too deeply (write one flat object per line)")
    if not isinstance(obj, dict):
        return BatchLine(n, error=f'{where}: expected a JSON object such as {{"prompt": "..."}}')
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        return BatchLine(n, error=f'{where}: no "prompt" string')
    settings = {k: v for k, v in obj.items() if k != "prompt"}
    for key, value in settings.items():
        kind = SETTINGS.get(key)
        if kind is None:
            known = ", ".join(sorted(SETTINGS))
            return BatchLine(n, error=f"{where}: unknown setting {key!r} (known: prompt, {known})")
        if isinstance(value, bool) or not isinstance(value, kind):
            return BatchLine(n, error=f"{where}: {key} has the wrong type ({type(value).__name__})")
        if key == "stop" and isinstance(value, list) and not all(isinstance(x, str) for x in value):
            return BatchLine(n, error=f"{where}: stop must be a string or a list of strings")
    return BatchLine(n, prompt, settings)


# What a line may set besides its fusion choice and sampling: the rest of a SeqSpec (utf8_guard is the
# command's alone, and SETTINGS does not list it).
SPEC_FIELDS = tuple(f.name for f in fields(SeqSpec) if f.name not in ("fusion", "sampling"))
CHOICE_FIELDS = tuple(f.name for f in fields(MethodChoice))


@dataclass(frozen=True)
class BatchDefaults:
    """The command's own settings, which each line may override: its fusion choice, its sampling
    flags (named as :func:`sampling_params` takes them; absent or ``None``: not given) and the rest
    of a :class:`SeqSpec` by field name (``max_tokens``, ``stop``, ``utf8_guard``, ``draft``,
    ``logprobs``; absent: SeqSpec's default)."""

    choice: MethodChoice
    sampling: Mapping[str, Any] = field(default_factory=dict)
    spec: Mapping[str, Any] = field(default_factory=dict)


def line_spec(defaults: BatchDefaults, settings: Mapping[str, Any], profile: object | None = None) -> SeqSpec:
    """The sequence a line asks for: the command's settings with the line's on top."""
    s = dict(settings)
    overrides = {k: s[k] for k in CHOICE_FIELDS if k in s}
    choice = replace(defaults.choice, **overrides)
    if {"alpha", "beta"} & set(overrides) and "select" not in overrides:
        choice = replace(choice, select=None, grid_alpha=None, grid_beta=None, max_logits_mib=None)
    fusion = resolve_fusion(choice, profile)
    sampling = sampling_params(**(dict(defaults.sampling) | {k: s[k] for k in SAMPLING_FIELDS if k in s}))
    spec = dict(defaults.spec) | {k: s[k] for k in SPEC_FIELDS if k in s}
    if "stop" in spec:
        spec["stop"] = (spec["stop"],) if isinstance(spec["stop"], str) else tuple(spec["stop"])
    check_logprobs(spec.get("logprobs"))
    return SeqSpec(fusion, sampling, **spec)


@dataclass
class BatchResult:
    line: int
    generation: Generation | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"line": self.line, "error": self.error}
        assert self.generation is not None
        return {"line": self.line, **self.generation.as_dict()}


def run_batch(
    engine: Engine,
    lines: list[BatchLine],
    make_spec: Callable[[Mapping[str, Any]], SeqSpec],
    make_prompt: Callable[[str], str | np.ndarray],
    where: str,
) -> Iterator[BatchResult]:
    """Queue every line, then yield one result per line in input order as soon as it is done
    (later lines keep decoding meanwhile)."""
    queued: list[tuple[BatchLine, Generation | None, str | None]] = []
    for bl in lines:
        if bl.error is not None:
            queued.append((bl, None, bl.error))
            continue
        try:
            spec = make_spec(bl.settings)
            gen = engine.generate_many(make_prompt(bl.prompt), [spec])[0]
            queued.append((bl, gen, None))
        except TrimixError as e:
            queued.append((bl, None, f"{where}:{bl.line}: {e.render(flag)}"))  # a batch comes from the command line
    for bl, gen, err in queued:
        if gen is None:
            yield BatchResult(bl.line, error=err)
            continue
        try:
            gen.run()
            yield BatchResult(bl.line, gen)
        except TrimixError as e:
            yield BatchResult(bl.line, error=f"{where}:{bl.line}: {e.render(flag)}")
