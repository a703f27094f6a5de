"""Choosing the in-context examples of a task, and writing each as a solved block.

As in the authors' code, the examples are the first ``shots`` records of the train file and the same
for every item, so that scores differ by item and not by the luck of a draw. Classification takes
them one label after another, so that a handful of examples shows every label rather than the first
label's records only. How many of them a prompt then holds is the budget's business (:mod:`.fitting`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .items import Example
from .records import Parsed


def make_examples(
    template: str, fields: Mapping[str, str], train: Sequence[Parsed], k: int, labelled: bool
) -> tuple[Example, ...]:
    """The examples of a task: ``k`` train records chosen by :func:`pick_examples`, each rendered with
    ``template`` (``fields`` are those every block of the task shares) and followed by its answer."""
    return tuple(
        Example(p.id, _solved(template.format(**fields, **p.fields), p.shown))
        for p in pick_examples(train, k, labelled)
    )


def pick_examples(train: Sequence[Parsed], k: int, labelled: bool) -> list[Parsed]:
    """The first ``k`` train records; for classification, one label after another so each is shown."""
    if not labelled:
        return list(train[:k])
    by_label: dict[str | None, list[Parsed]] = {}
    for p in train:
        by_label.setdefault(p.label, []).append(p)
    picked: list[Parsed] = []
    depth = 0
    while len(picked) < k and any(depth < len(group) for group in by_label.values()):
        picked.extend(group[depth] for group in by_label.values() if depth < len(group))
        depth += 1
    return picked[:k]


def _solved(block: str, answer: str) -> str:
    """An example: the block with its answer one space after the cue (the cue of open generation,
    ``English: ``, ends with that space already; ``Answer:`` does not)."""
    return block + ("" if block.endswith(" ") else " ") + answer


__all__ = ["make_examples", "pick_examples"]
