"""Cutting prompts to the context budget: fewer examples first, then a shorter passage.

A prompt that overflows the model's context cannot be answered at all, so an item that would not fit
gets fewer in-context examples (the last ones go first), and when it does not fit even with none, the
passage of a title or classification item is cut further until it does: one long article must not
stop a run. Reading passages are never cut (the answer may lie in the part that would go); such an
item is kept as it is and reported. The budget is counted in characters, or in the model's own
tokens when :class:`PromptSettings` is given a counter.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from .items import Example, PromptSettings


class Fit(NamedTuple):
    """A prompt fitted to a budget, and what fitting it took.

    ``n_shots``: the examples it holds (the first ones of the task's). ``cut_to``: the passage
    characters kept when the passage had to be cut (None when it was not). ``over``: what the prompt
    costs with no examples when even that is over the budget (None when it fits).
    """

    prompt: str
    n_shots: int
    cut_to: int | None
    over: int | None


def fit_prompt(
    examples: Sequence[Example],
    template: str,
    common: Mapping[str, str],
    fields: Mapping[str, str],
    cut: str | None,
    budget: PromptSettings,
) -> Fit:
    """An item's prompt with as many ``examples`` as ``budget`` allows, its passage (the field named
    ``cut``, None for a task whose passages are never cut) cut when none is left room.

    ``common`` are the template fields every block of the task shares, ``fields`` the item's own.
    """
    prompt, n, over = _fit_examples(examples, template.format(**common, **fields), budget)
    cut_to = None
    if over is not None and cut is not None:
        passage = fields[cut]

        def block_with(k: int) -> str:
            return template.format(**common, **{**fields, cut: clip(passage, k)})

        fitted = _cut_to_fit(block_with, len(passage), budget)
        if fitted is not None:
            (prompt, cut_to), over = fitted, None
    return Fit(prompt, n, cut_to, over)


def clip(text: str, limit: int) -> str:
    """The first ``limit`` characters, backing off so that no base letter loses its combining marks."""
    if len(text) <= limit:
        return text
    cut = limit
    while cut > 0 and unicodedata.category(text[cut])[0] == "M":
        cut -= 1
    return text[:cut]


def _fit_examples(examples: Sequence[Example], block: str, settings: PromptSettings) -> tuple[str, int, int | None]:
    """The prompt with as many examples as the budget allows: (prompt, examples used, cost if over budget).

    Each example is followed by a blank line, as the authors separate them; the last examples go first.
    """
    n = len(examples)
    while True:
        prompt = "".join(f"{e.text}\n\n" for e in examples[:n]) + block
        if settings.max_prompt is None:
            return prompt, n, None
        cost = settings.cost(prompt)
        if cost <= settings.max_prompt:
            return prompt, n, None
        if n == 0:
            return prompt, 0, cost
        n -= 1


def _cut_to_fit(block_with: Callable[[int], str], length: int, settings: PromptSettings) -> tuple[str, int] | None:
    """The block whose passage is cut to the most characters (fewer than ``length``) that fit the
    budget on their own, and that number; None when even an empty passage does not fit.

    ``block_with(n)`` renders the block with the passage's first ``n`` characters. Cost grows with
    ``n``, so a binary search needs about log2(length) token counts.
    """
    assert settings.max_prompt is not None
    if settings.cost(block_with(0)) > settings.max_prompt:
        return None
    lo, hi = 0, length - 1  # the block fits with lo characters; the answer is at most hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if settings.cost(block_with(mid)) <= settings.max_prompt:
            lo = mid
        else:
            hi = mid - 1
    return block_with(lo), lo


__all__ = ["Fit", "clip", "fit_prompt"]
