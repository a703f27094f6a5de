"""``trimix bench``: what this machine does with these models, measured, and the settings to use.

The first thing to run on a new machine, as ``llama-bench`` is for llama.cpp. Every figure comes
from the engine trimix generates with, on the user's own model files:

* prompt evaluation: tokens/s of each model alone, and of every model with perplexity selection
  over the grid (logits at every prompt position, the grid reduction);
* decoding: tokens/s of each model alone and of the fused models, at the default thread count and
  at fewer threads;
* speculative decoding (``--draft K``) against plain fused decoding;
* aggregate tokens/s with P sequences decoding together (``--parallel P``), each continuing a
  different prompt.

A time budget bounds the whole run: a measurement that would start after it is skipped and said so.
The recommendation picks, for this machine, the thread count, the draft length and the parallel
sequences that measured best (a draft or more sequences only when they gain at least 5 %).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import _llama
from .engine import Engine, SeqSpec
from .errors import TrimixError
from .fusion import LARGE_INS, FusionPlan, plan
from .loading import LoadOptions
from .selection import SELECTION_ROLES, Selector
from .speculative import draft_plan

# A gain smaller than this is within a shared machine's noise: the simpler setting is recommended.
MIN_GAIN = 1.05
_TEXT = (
    "The river runs through the old town, past the market and the bridge where the fishermen sell "
    "their catch every morning. In the evening the lamps are lit and the children run along the "
    "water, while their parents talk about the harvest, the weather and the news from the city. "
)

Progress = Callable[[str, float], None]  # (what is being measured, share of the budget used)


@dataclass
class BenchReport:
    """Every figure of a run; ``skipped`` names what the time budget left out."""

    system: str
    threads: int
    prompt_tokens: int
    gen_tokens: int
    prompt_tokens_per_s: dict[str, float] = field(default_factory=dict)
    decode_tokens_per_s: dict[str, float] = field(default_factory=dict)
    fused_weights: dict[str, float] = field(default_factory=dict)
    threads_tokens_per_s: dict[int, float] = field(default_factory=dict)
    draft_tokens_per_s: dict[int, float] = field(default_factory=dict)
    draft_acceptance: dict[int, float] = field(default_factory=dict)
    parallel_tokens_per_s: dict[int, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    recommended: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        for key in ("threads_tokens_per_s", "draft_tokens_per_s", "draft_acceptance", "parallel_tokens_per_s"):
            out[key] = {str(k): round(v, 3) for k, v in out[key].items()}
        for key in ("prompt_tokens_per_s", "decode_tokens_per_s"):
            out[key] = {k: round(v, 3) for k, v in out[key].items()}
        out["seconds"] = round(self.seconds, 2)
        return out


def _prompt_tokens(engine: Engine, n: int, variant: int = 0) -> np.ndarray:
    """``n`` tokens of ordinary text (a different start per variant, so prompts differ)."""
    words = _TEXT.split()
    text = " ".join(words[variant % len(words) :] + words[: variant % len(words)])
    tokens = engine.tokenize(text * (1 + n // 20))
    while len(tokens) < n:
        tokens = np.concatenate([tokens, tokens])
    return tokens[:n]


def _gen_rate(gens) -> float:
    tokens = sum(g.timings.gen_tokens for g in gens)
    seconds = max(g.timings.gen_s for g in gens)
    return tokens / seconds if seconds > 0 else 0.0


def _check_list(name: str, values: Sequence[int], lo: int, hi: int) -> None:
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise TrimixError(
                "{param} takes whole numbers from {lo} to {hi}, got {got!r}", param=name, lo=lo, hi=hi, got=v
            )


def run_bench(
    paths: Mapping[str, str | Path],
    options: LoadOptions,
    *,
    prompt_tokens: int = 256,
    gen_tokens: int = 64,
    drafts: Sequence[int] = (2, 4, 6),
    parallel: Sequence[int] = (1, 4, 8),
    budget_s: float = 90.0,
    progress: Progress | None = None,
) -> BenchReport:
    """Measure the models in ``paths`` (roles to GGUF files) on this machine within ``budget_s``."""
    from .speculative import MAX_DRAFT

    _check_list("prompt_tokens", [prompt_tokens], 2, 1 << 16)
    _check_list("gen_tokens", [gen_tokens], 1, 1 << 16)
    _check_list("drafts", list(drafts), 1, MAX_DRAFT)
    _check_list("parallel", list(parallel), 1, _llama.MAX_SEQ - 1)
    if not (budget_s > 0):
        raise TrimixError("{budget_s} must be a positive number of seconds, got {got}", param="budget_s", got=budget_s)
    started = time.perf_counter()
    n_seq = max([1, *parallel])
    n_ctx = prompt_tokens + gen_tokens + max([0, *drafts]) + 8
    opts = LoadOptions(
        n_ctx=max(n_ctx, 64),
        n_batch=options.n_batch,
        n_threads=options.n_threads,
        n_gpu_layers=options.n_gpu_layers,
        verbose=options.verbose,
        n_seq=n_seq,
    )
    threads = opts.n_threads or _llama.default_threads()
    report = BenchReport(_llama.system_info(), threads, prompt_tokens, gen_tokens)

    def spent() -> float:
        return time.perf_counter() - started

    def step(what: str) -> bool:
        """Whether there is time left for ``what``; reports progress."""
        if spent() >= budget_s:
            report.skipped.append(what)
            return False
        if progress is not None:
            progress(what, min(1.0, spent() / budget_s))
        return True

    with Engine(paths, opts) as eng:
        eng.scheduler.governor = None  # each measurement runs at the thread count it names
        roles = tuple(eng.models)
        prompt = _prompt_tokens(eng, prompt_tokens)
        for r in roles:
            if step(f"prompt {r}"):
                t0 = time.perf_counter()
                eng.evaluate_prompt(prompt, roles=(r,))
                report.prompt_tokens_per_s[r] = prompt_tokens / (time.perf_counter() - t0)
        fusion: FusionPlan = plan("single") if LARGE_INS in roles else plan("single", role=roles[0])
        if all(r in roles for r in SELECTION_ROLES) and step("prompt with PPL selection"):
            t0 = time.perf_counter()
            sel = eng.select(prompt, Selector("ppl"))
            report.prompt_tokens_per_s["ppl_selection"] = prompt_tokens / (time.perf_counter() - t0)
            fusion = sel.plan()
        report.fused_weights = dict(fusion.weights)
        for r in roles:
            if step(f"decode {r}"):
                gen = eng.generate(prompt, plan("single", role=r), max_tokens=gen_tokens).run()
                report.decode_tokens_per_s[r] = _gen_rate([gen])
        if step("decode fused"):
            report.decode_tokens_per_s["fused"] = _gen_rate([eng.generate(prompt, fusion, max_tokens=gen_tokens).run()])
        for n in sorted({threads, max(1, threads // 2), 1}, reverse=True):
            if n == threads:
                report.threads_tokens_per_s[n] = report.decode_tokens_per_s.get("fused", 0.0)
            elif step(f"decode fused, {n} threads"):
                eng.set_threads(n)
                try:
                    gen = eng.generate(prompt, fusion, max_tokens=gen_tokens).run()
                finally:
                    eng.set_threads(threads)
                report.threads_tokens_per_s[n] = _gen_rate([gen])
        if draft_plan(fusion) is not None:
            for k in drafts:
                if step(f"draft {k}"):
                    gen = eng.generate(prompt, fusion, max_tokens=gen_tokens, draft=k).run()
                    report.draft_tokens_per_s[k] = _gen_rate([gen])
                    t = gen.timings
                    report.draft_acceptance[k] = t.accepted_tokens / t.draft_tokens if t.draft_tokens else 0.0
        for p in parallel:
            if step(f"parallel {p}"):
                prompts = [_prompt_tokens(eng, prompt_tokens, variant=v) for v in range(p)]
                gens = eng.generate_batch(prompts, SeqSpec(fusion, max_tokens=gen_tokens))
                t0 = time.perf_counter()
                eng.run(gens)
                wall = time.perf_counter() - t0
                # the batch's own decode rate: every sequence's tokens over the time from the first
                # token to the last (the prompts' evaluations are not decoding)
                prompt_s = sum(g.timings.prompt_s for g in gens)
                report.parallel_tokens_per_s[p] = sum(g.timings.gen_tokens for g in gens) / max(wall - prompt_s, 1e-9)
    report.seconds = spent()
    report.recommended = recommend(report)
    return report


def recommend(report: BenchReport) -> dict[str, int]:
    """The settings that measured best: fewer threads, no draft and fewer sequences unless more
    gains at least :data:`MIN_GAIN`."""
    out: dict[str, int] = {}
    if report.threads_tokens_per_s:
        best = max(report.threads_tokens_per_s.values())
        out["threads"] = min(n for n, v in report.threads_tokens_per_s.items() if v * MIN_GAIN >= best)
    plain = report.decode_tokens_per_s.get("fused", 0.0)
    gains = {k: v for k, v in report.draft_tokens_per_s.items() if plain and v >= plain * MIN_GAIN}
    out["draft"] = max(gains, key=lambda k: gains[k]) if gains else 0
    if report.parallel_tokens_per_s:
        ordered = sorted(report.parallel_tokens_per_s.items())
        choice, rate = ordered[0]
        for p, v in ordered[1:]:
            if v >= rate * MIN_GAIN:
                choice, rate = p, v
        out["parallel"] = choice
    return out
