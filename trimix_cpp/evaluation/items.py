"""What reading a task gives: its items and in-context examples, what was skipped, and how prompts are budgeted.

These are the types every other part of the evaluation shares: the readers (:mod:`.readers`) build
them, and a run (:mod:`.pipeline`) takes each task's :class:`FittedItems` under the model's context budget
and scores its :class:`Item` s. They sit below every reader and every prompt rule, so that any module
may use them without importing the readers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import TrimixError
from .metrics import Kind, Metric


class TaskError(TrimixError):
    """A task file is missing, unreadable, or not in the expected format as a whole."""


@dataclass(frozen=True)
class RecordWarning:
    """A record skipped (or kept with a caveat) while reading, and where it is."""

    path: str
    field: str | None
    message: str
    line: int | None = None
    index: int | None = None

    def __str__(self) -> str:
        where = self.path
        if self.line is not None:
            where += f":{self.line}"
        if self.index is not None:
            where += f" record [{self.index}]"
        what = f"field {self.field!r}: " if self.field else ""
        return f"{where}: {what}{self.message}"


@dataclass(frozen=True)
class Example:
    """One in-context example: its id and the block shown in the prompt, answer included."""

    id: str
    text: str


@dataclass(frozen=True)
class Item:
    """One evaluation item: the full prompt, the gold answer, and how to score a generation.

    ``kind`` names the answer rule: ``generate`` scores the first line of the generation as it is
    (a translation, a title, a class label), ``choice`` reads a letter A.. from its first character
    (``gold`` is that letter, ``options`` the texts it indexes), ``math`` reads its last number
    (``gold`` is the number as text). For classification ``options`` holds the candidate labels.
    ``shot_ids`` are the in-context examples the prompt holds, ``n_shots`` of them. ``cut_to`` is the
    number of passage characters kept when the passage had to be cut to fit the prompt budget (None
    when it was not: the fixed ``max_passage_chars`` cut does not count).
    """

    id: str
    prompt: str
    gold: str
    options: tuple[str, ...] | None
    kind: Kind
    metric: Metric
    n_shots: int
    shot_ids: tuple[str, ...] = ()
    cut_to: int | None = None


@dataclass(frozen=True)
class TaskData:
    """What a reader returns: the items, the examples offered to them, and what was skipped.

    ``task`` names the task and its language (``translation:ug-en``, ``belebele:bod_Tibt``): item ids
    repeat across the languages of a parallel benchmark, so (task, id) is the key of a prediction.
    ``files`` are the files the task was read from (items first, then examples), which a run folder
    fingerprints so that it is never resumed on other data.
    """

    task: str
    items: tuple[Item, ...]
    examples: tuple[Example, ...]
    warnings: tuple[RecordWarning, ...]
    files: tuple[str, ...] = ()
    _fit: Callable[[int, PromptSettings], tuple[Item, tuple[RecordWarning, ...]]] | None = field(
        default=None, repr=False, compare=False
    )

    def fitted(self, budget: PromptSettings) -> FittedItems:
        """The items again, each fitted to ``budget`` when first read (see :class:`FittedItems`).

        The examples stay those the task was read with; only how many of them a prompt holds, and
        how much of its passage, follow the budget.
        """
        return FittedItems(self, budget)

    def head(self, limit: int | None) -> tuple[Item, ...]:
        """The first ``limit`` items (all of them for None); a limit below 1 is an error, not "all"."""
        if limit is None:
            return self.items
        check_limit(limit)
        return self.items[:limit]


class FittedItems(Sequence[Item]):
    """A task's items with each prompt fitted to a budget the first time it is read.

    Fitting counts tokens with the model's tokenizer, several times for an item whose passage must
    be cut; a run of the first few items of a 500-item task (and a calibration sample of it) reads
    only those, so only those are tokenized. ``warnings`` holds what fitting reported for the items
    read so far.
    """

    def __init__(self, data: TaskData, budget: PromptSettings) -> None:
        self._data = data
        self._budget = budget
        self._done: dict[int, Item] = {}
        self.warnings: list[RecordWarning] = []

    def __len__(self) -> int:
        return len(self._data.items)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(len(self))))
        i = range(len(self))[index]  # negative indices, and IndexError past the end
        if i not in self._done:
            if self._data._fit is None:
                item, reported = self._data.items[i], ()
            else:
                item, reported = self._data._fit(i, self._budget)
            self._done[i] = item
            self.warnings.extend(reported)
        return self._done[i]


def check_limit(limit: int | None) -> None:
    """``--limit`` counts items: 0 or a negative number is a mistake (Python slicing would take it as
    "all" or "all but the last"), so it is refused."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise TaskError(
            "{limit} must be a whole number of items, 1 or more, got {got!r} (leave it out for all)",
            param="limit",
            got=limit,
        )


@dataclass(frozen=True)
class PromptSettings:
    """How prompts are built.

    ``shots``: in-context examples per prompt at most (the authors use 3 to 5).
    ``max_passage_chars``: the texts of title generation and classification are cut to this many
    characters, as the authors cut theirs (1024), so one long article cannot crowd out the examples.
    Reading passages are never cut: the answer may lie in the part that would go.
    ``max_prompt``: the budget of a whole prompt, in characters, or in tokens when ``count_tokens``
    is given (pass the model's own tokenizer count). An item whose prompt would overflow gets fewer
    examples; one that overflows with none is kept and reported.
    """

    shots: int = 5
    max_passage_chars: int = 1024
    max_prompt: int | None = None
    count_tokens: Callable[[str], int] | None = None

    def __post_init__(self) -> None:
        if self.shots < 0:
            raise TaskError(f"shots must be 0 or more, got {self.shots}")
        if self.max_passage_chars < 1:
            raise TaskError(f"max_passage_chars must be at least 1, got {self.max_passage_chars}")
        if self.max_prompt is not None and self.max_prompt < 1:
            raise TaskError(f"max_prompt must be at least 1, got {self.max_prompt}")

    def cost(self, prompt: str) -> int:
        return self.count_tokens(prompt) if self.count_tokens is not None else len(prompt)


__all__ = [
    "Example",
    "FittedItems",
    "Item",
    "PromptSettings",
    "RecordWarning",
    "TaskData",
    "TaskError",
    "check_limit",
]
