"""A task's prompts from its parsed records: the candidate labels, the examples, and each item fitted.

Every reader ends here, so that all formats make prompts the same way: the labels of a classification
task are listed in sorted order, so that a prompt is the same in every process (the authors' code lists
them in the order of a Python set, which changes from one process to the next); the examples are
chosen once per task (:mod:`.fewshot`); each item is fitted to the budget (:mod:`.fitting`) when read,
and again, lazily, for each model's budget through :meth:`TaskData.fitted`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from .fewshot import make_examples
from .fitting import fit_prompt
from .items import Item, PromptSettings, RecordWarning, TaskData
from .records import Parsed, TaskFormat, warning_at
from .templates import TEMPLATES


def build_task(
    task: str,
    spec: TaskFormat,
    items: Sequence[Parsed],
    train: Sequence[Parsed],
    paths: tuple[Path, Path | None],
    common: Mapping[str, str],
    settings: PromptSettings,
    warnings: list[RecordWarning],
) -> TaskData:
    """Render examples and items with the task's template; ``paths`` are (evaluated file, train file)."""
    path, train_path = paths
    template = TEMPLATES[spec.template]
    fields = dict(common)
    labels: tuple[str, ...] | None = None
    if spec.labelled:
        # Candidate labels from the train file when there is one, sorted: the same list in every process.
        labels = tuple(sorted({p.label for p in (train or items) if p.label is not None}))
        fields["labels"] = ", ".join(labels)
    label_source = train_path if train else path
    examples = make_examples(template, fields, train, settings.shots, spec.labelled)

    def fit(i: int, budget: PromptSettings) -> tuple[Item, tuple[RecordWarning, ...]]:
        """Item ``i`` fitted to ``budget``, and the warning of an item that does not fit even so."""
        p = items[i]
        prompt, n, cut_to, over = fit_prompt(examples, template, fields, p.fields, p.cut, budget)
        reported: tuple[RecordWarning, ...] = ()
        if over is not None:
            message = (
                f"the prompt costs {over} with no examples, over the budget of {budget.max_prompt}; kept "
                "(scored as no answer if it does not fit the context: raise --n-ctx)"
            )
            reported = (warning_at(path, p.where, None, message),)
        options = labels if labels is not None else p.options
        shot_ids = tuple(e.id for e in examples[:n])
        return Item(p.id, prompt, p.gold, options, spec.kind, spec.metric, n, shot_ids, cut_to), reported

    built: list[Item] = []
    for i, p in enumerate(items):
        item, reported = fit(i, settings)
        warnings.extend(reported)
        if labels is not None and p.gold not in labels:
            message = f"{p.gold!r} is not a candidate label (from {label_source}): the item cannot be answered"
            warnings.append(warning_at(path, p.where, "label", message))
        built.append(item)
    cut = sorted(item.cut_to for item in built if item.cut_to is not None)
    if cut:
        message = (
            f"{len(cut)} of {len(items)} passages did not fit the prompt budget of {settings.max_prompt} even "
            f"without examples and were cut to {cut[0]}-{cut[-1]} characters (raise --n-ctx to keep more)"
        )
        warnings.append(RecordWarning(str(path), next(p.cut for p in items if p.cut), message))
    files = tuple(str(f) for f in (path, train_path) if f is not None and f.is_file())
    return TaskData(task, tuple(built), examples, tuple(warnings), files, fit)


__all__ = ["build_task"]
