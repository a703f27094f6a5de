"""Evaluating a prompt once in every model, and everything read off that one pass.

A prompt's evaluation is the expensive part of every method: hundreds of tokens through each model.
Everything label-free that TriMix needs comes from that same pass:

* generation continues from it (the KV cells of the prompt are shared with every sequence that
  continues it, see :mod:`trimix_cpp.generation`);
* perplexity selection folds each chunk of all-position logits into every grid pair's NLL while
  the prompt goes through (:class:`~trimix_cpp.selection.GridNLL`), so it costs no second pass;
* entropy selection reads the last position's logits;
* likelihood scoring of answer options continues the prompt in place, option by option.

The functions here take the models of an engine and one llama.cpp sequence id to work in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ._llama import LlamaModel
from .errors import ContextOverflowError, TrimixError
from .fusion import LARGE_INS, ROLES, SMALL_BASE, SMALL_CPT, FusionPlan
from .scoring import MethodScore, PerplexityScorer, windows
from .selection import (
    SELECTION_ROLES,
    GridNLL,
    GridRows,
    GridScores,
    Selection,
    Selector,
    choose,
    entropy_grid,
)

ChunkCallback = Callable[[Mapping[str, np.ndarray], np.ndarray], None]


def evaluate(
    models: Mapping[str, LlamaModel],
    tokens: np.ndarray,
    seq: int,
    *,
    start: int = 0,
    fold_roles: Sequence[str] = (),
    on_chunk: ChunkCallback | None = None,
    chunk_rows: int | None = None,
) -> None:
    """Decode ``tokens`` into sequence ``seq`` of every model, at positions ``start`` onwards.

    Models not in ``fold_roles`` compute the last position's logits only. Those in it go through in
    chunks of ``chunk_rows`` positions with logits at every position; after each chunk
    ``on_chunk(rows, targets)`` gets their (n, n_vocab) logits views and the token that follows each
    position (one fewer for the last chunk), and must be done with the views when it returns.
    Afterwards every model's :meth:`~LlamaModel.logits_row` (-1) is the last position's logits.
    """
    n = len(tokens)
    folded = [r for r in fold_roles if r in models]
    for role, m in models.items():
        if role in folded:
            continue
        for s in range(0, n, m.n_batch):
            e = min(n, s + m.n_batch)
            flags = np.zeros(e - s, dtype=np.int8)
            if e == n:
                flags[-1] = 1
            m.decode_batch(tokens[s:e], np.arange(start + s, start + e, dtype=np.int32), seq, flags)
    if not folded:
        return
    step = max(1, min(chunk_rows or n, *(models[r].n_batch for r in folded)))
    for s in range(0, n, step):
        e = min(n, s + step)
        pos = np.arange(start + s, start + e, dtype=np.int32)
        for r in folded:
            models[r].decode_batch(tokens[s:e], pos, seq, 1)
        if on_chunk is not None:
            on_chunk({r: models[r].logits_rows(e - s) for r in folded}, tokens[s + 1 : e + 1])


@dataclass
class PromptPass:
    """What one prompt evaluation yielded: a :class:`Selection` per selector asked for."""

    n_tokens: int
    seconds: float
    selections: dict[Selector, Selection] = field(default_factory=dict)
    grids: dict[Selector, GridScores] = field(default_factory=dict)
    evaluated: int = 0  # positions decoded in the model that decoded the most (the rest were cached)
    kept: GridNLL | None = None  # the open accumulator over ``rows``, for the caller to go on folding and close


def evaluate_prompt(
    models: Mapping[str, LlamaModel],
    n_vocab: int,
    tokens: np.ndarray,
    seq: int,
    roles: Sequence[str],
    selectors: Sequence[Selector] = (),
    *,
    held: Mapping[str, int] | None = None,
    rows: GridRows | None = None,
) -> PromptPass:
    """Evaluate ``tokens`` once in the models of ``roles`` and choose a pair for every selector.

    Every perplexity selector folds the same chunks; entropy selectors read the last position. A
    one-token prompt predicts nothing, so it has no perplexity: its perplexity selectors choose by
    entropy instead, and their :class:`Selection` says so.

    A cached prefix (a conversation's earlier turns): ``held[role]`` leading tokens are already in
    that model's cells of ``seq`` (each at most ``len(tokens) - 1``, so the last position is always
    decoded and gives the logits generation needs); the cells after them are dropped and only the
    rest is decoded. ``rows`` keeps the per-position NLL of a perplexity selector's grid for the
    history: its first ``rows.n`` rows (each at most ``len(tokens) - 1``) are summed in, only the
    later positions are folded, and they are added to it. The sums are additive over positions, so
    the selection equals a full evaluation's. The accumulator over ``rows`` stays open in
    :attr:`PromptPass.kept` so that generation can go on adding the rows of the tokens it picks.
    """
    t0 = time.perf_counter()
    used = {r: models[r] for r in ROLES if r in roles or (selectors and r in SELECTION_ROLES)}
    ppl = list(dict.fromkeys(s for s in selectors if s.strategy == "ppl"))
    final = len(tokens) - 1
    start = {r: max(0, min((held or {}).get(r, 0), final)) for r in used}
    keep = None
    if rows is not None and len(ppl) == 1 and rows.matches(ppl[0].alphas, ppl[0].betas):
        keep = ppl[0]
    grids: dict[Selector, GridNLL] = {}
    ok = False
    try:
        if ppl:
            fold_from = 0
            if keep is not None:
                assert rows is not None
                rows.truncate(min(rows.n, final, *(start[r] for r in SELECTION_ROLES)))
                fold_from = rows.n
            for r in SELECTION_ROLES:
                start[r] = fold_from
            for s in ppl:
                grids[s] = GridNLL(s.alphas, s.betas, n_vocab, s.threads, rows=rows if s is keep else None)
        if held is not None:
            for r, m in used.items():
                m.seq_rm(seq, start[r], -1)
        for r, m in used.items():
            if not (ppl and r in SELECTION_ROLES):
                evaluate({r: m}, tokens[start[r] :], seq, start=start[r])
        if ppl:
            budget = min(ppl, key=lambda s: s.max_logits_mib)
            f0 = start[SELECTION_ROLES[0]]
            chunk = budget.chunk_rows(n_vocab, [used[r].n_vocab for r in SELECTION_ROLES], len(tokens) - f0)

            def fold(chunk_rows: Mapping[str, np.ndarray], targets: np.ndarray) -> None:
                for g in grids.values():
                    g.add(chunk_rows[LARGE_INS], chunk_rows[SMALL_CPT], chunk_rows[SMALL_BASE], targets)

            sel = {r: used[r] for r in SELECTION_ROLES}
            evaluate(sel, tokens[f0:], seq, start=f0, fold_roles=SELECTION_ROLES, on_chunk=fold, chunk_rows=chunk)
        out = PromptPass(len(tokens), 0.0, evaluated=max(len(tokens) - start[r] for r in used))
        last = None
        for sel in dict.fromkeys(selectors):
            grid = grids.get(sel)
            if grid is not None and grid.scores.n_rows:
                scores = grid.scores.mean_nll
                out.selections[sel] = _selection(sel, "ppl", scores, grid.scores.single_mean_nll(), len(tokens))
                out.selections[sel].dense_fallbacks = grid.scores.n_dense_fallback
                out.grids[sel] = grid.scores
                continue
            if last is None:
                last = {r: used[r].logits_row(-1)[:n_vocab] for r in SELECTION_ROLES}
            scores = entropy_grid(last[LARGE_INS], last[SMALL_CPT], last[SMALL_BASE], sel.alphas, sel.betas)
            note = None
            if sel.strategy == "ppl":
                note = f"the prompt has {len(tokens)} token, so no perplexity: chose by entropy"
            out.selections[sel] = _selection(sel, "ent", scores, {}, len(tokens), note)
        ok = True
    finally:
        for s, g in grids.items():
            if not (ok and s is keep):  # the kept one goes to the caller
                g.close()
    if keep is not None:
        out.kept = grids[keep]
    out.seconds = time.perf_counter() - t0
    for s in out.selections.values():
        s.seconds = out.seconds
    return out


def _selection(
    sel: Selector, strategy: str, scores: np.ndarray, single: dict[str, float], n: int, note: str | None = None
) -> Selection:
    return Selection(
        strategy=strategy,
        alphas=sel.alphas,
        betas=sel.betas,
        scores=scores,
        chosen=choose(sel.alphas, sel.betas, scores),
        single_nll=single,
        n_tokens=n,
        requested=sel.strategy,
        note=note,
    )


def scoring_roles(plans: Iterable[FusionPlan | Selector], grid: bool = False) -> tuple[str, ...]:
    """The models that scoring under ``plans`` reads, in canonical order: each fixed plan's own, and
    the selection trio for a selector (or, with ``grid``, for a whole TriMix grid)."""
    plans = list(plans)
    trio = grid or any(isinstance(p, Selector) for p in plans)
    used = {r for p in plans if isinstance(p, FusionPlan) for r in p.roles} | (set(SELECTION_ROLES) if trio else set())
    return tuple(r for r in ROLES if r in used)


def perplexity(
    models: Mapping[str, LlamaModel],
    n_vocab: int,
    text_tokens: np.ndarray,
    bos: Sequence[int],
    seq: int,
    n_ctx: int,
    plans: Mapping[str, FusionPlan],
    window: int | None,
    max_logits_mib: float,
    grid: Selector | None,
) -> tuple[dict[str, MethodScore], GridScores | None]:
    """:meth:`Engine.perplexity` on sequence ``seq``: ``text_tokens`` (no BOS) are scored in windows
    that each begin with ``bos``; a ``window`` of ``None`` is the context ``n_ctx``, and
    ``max_logits_mib`` bounds the logits of one chunk of positions."""
    roles = scoring_roles(plans.values(), grid is not None)
    tokens = text_tokens
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 8):
        raise TrimixError(
            "{window} must be a whole number of at least 8 tokens, got {got!r}", param="window", got=window
        )
    width = min(window or n_ctx, n_ctx) - len(bos) - 1
    if width < 2:
        raise TrimixError(f"a scoring window of {window or n_ctx} tokens is too small (give at least 8)")
    if len(tokens) < 1:
        raise TrimixError("the text to score is empty")
    if len(tokens) + len(bos) < 2:
        raise TrimixError(
            "the text is a single token and this model adds no BOS token, so no token is predicted (give a longer text)"
        )
    used = {r: models[r] for r in roles}
    scorer = PerplexityScorer(plans, n_vocab)
    grid_nll = GridNLL(grid.alphas, grid.betas, n_vocab, grid.threads) if grid else None
    budget = Selector(max_logits_mib=max_logits_mib)
    chunk = budget.chunk_rows(n_vocab, [m.n_vocab for m in used.values()], min(m.n_batch for m in used.values()))
    try:
        for start, end, first_new in windows(len(tokens), width):
            win = np.asarray([*bos, *tokens[start:end].tolist()], dtype=np.int32)
            seen = 0

            def fold(rows: Mapping[str, np.ndarray], targets: np.ndarray, start=start, first_new=first_new) -> None:
                nonlocal seen
                n = len(targets)
                # row j is window position seen + j; its target is text token start + seen + j + 1 - len(bos)
                first = start + seen + 1 - len(bos)
                j0 = max(0, first_new - first)
                if j0 < n:
                    part = {r: x[j0:n] for r, x in rows.items()}
                    scorer.add(part, targets[j0:])
                    if grid_nll is not None:
                        grid_nll.add(part[LARGE_INS], part[SMALL_CPT], part[SMALL_BASE], targets[j0:])
                seen += len(next(iter(rows.values())))

            try:
                evaluate(used, win, seq, fold_roles=roles, on_chunk=fold, chunk_rows=chunk)
            finally:
                for m in used.values():
                    m.seq_rm(seq)
    finally:
        if grid_nll is not None:
            grid_nll.close()
    return scorer.scores, (grid_nll.scores if grid_nll is not None else None)


def option_nlls(
    models: Mapping[str, LlamaModel],
    n_vocab: int,
    prompt: np.ndarray,
    options: Sequence[np.ndarray],
    seq: int,
    n_ctx: int,
    plans: Mapping[str, FusionPlan | Selector],
) -> tuple[dict[str, list[float]], dict[str, Selection]]:
    """Mean NLL per token of every option after ``prompt``, under every plan (multiple choice by
    likelihood). The prompt is evaluated once (with selection, when a plan is a selector); each
    option then continues it in place and is removed again.

    Returns the NLLs by plan name (one per option, in order) and the selections made.
    """
    if any(len(o) == 0 for o in options):
        raise TrimixError("an answer option is empty")
    longest = max((len(o) for o in options), default=0)
    if len(prompt) + longest > n_ctx:
        raise ContextOverflowError(
            "the prompt and its longest option need {need} positions but the context holds {held} (raise {n_ctx})",
            param="n_ctx",
            need=len(prompt) + longest,
            held=n_ctx,
        )
    selectors = [p for p in plans.values() if isinstance(p, Selector)]
    roles = sorted(scoring_roles(plans.values()))
    try:
        ev = evaluate_prompt(models, n_vocab, prompt, seq, roles, selectors)
        resolved = {name: ev.selections[p].plan() if isinstance(p, Selector) else p for name, p in plans.items()}
        used = {r: models[r] for r in ROLES if r in roles}
        # the prompt's last row predicts each option's first token; the option decodes overwrite it
        last = {r: m.logits_row(-1)[:n_vocab].copy()[None, :] for r, m in used.items()}
        out: dict[str, list[float]] = {name: [] for name in plans}
        for opt in options:
            scorer = PerplexityScorer(resolved, n_vocab)
            scorer.add(last, opt[:1])
            if len(opt) > 1:
                # the option's own tokens; the row of its last token predicts nothing and is not read
                evaluate(used, opt, seq, start=len(prompt), fold_roles=tuple(used), on_chunk=scorer.add)
            for name in plans:
                out[name].append(scorer.scores[name].nll)
            for m in used.values():
                m.seq_rm(seq, len(prompt), -1)
        return out, {name: ev.selections[p] for name, p in plans.items() if isinstance(p, Selector)}
    finally:
        for m in models.values():
            m.seq_rm(seq)
