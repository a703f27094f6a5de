"""Evaluation tasks by their one-string specs, as ``trimix eval`` names them (:data:`SPEC_HELP`).

A task is read in steps, one module each: the file's records (:mod:`.records`), each benchmark's
fields (:mod:`.readers`), the in-context examples (:mod:`.fewshot`), the prompt templates
(:mod:`.templates`), and the cut to the context budget (:mod:`.fitting`), put together by
:mod:`.prompts` into the items of :mod:`.items`. This module picks the reader a spec names; the
readers themselves are the API for a caller that has the parts of a spec already.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .items import PromptSettings, TaskData, TaskError
from .readers import load_belebele, load_jsonl, load_milic, load_sib200

SPEC_HELP = (
    "A task is FILE.jsonl (records {input, gold, options?}), belebele:FILE:LANG, sib200:FILE:LANG, or "
    "milic:ROOT:TASK:LANG for MiLiC-Eval's layout ROOT/TASK/LANG/test.json (examples from train_1.json), "
    "TASK one of its folders: translation_dialogue, title_generation_200, text_classification, "
    "response_selection, reading_comprehension, math. Translation goes from LANG into English unless a "
    "direction follows: milic:ROOT:translation_dialogue:ug:ug-en (into English, the paper's ENG-G) or "
    "milic:ROOT:translation_dialogue:ug:en-ug (into Uyghur, LRL-G)."
)

_DIRECTION = re.compile(r"([A-Za-z]{2,3}(?:_[A-Za-z]+)?)-([A-Za-z]{2,3}(?:_[A-Za-z]+)?)")


def load_spec(spec: str, *, train: str | Path | None = None, settings: PromptSettings | None = None) -> TaskData:
    """A task from its one-string spec (:data:`SPEC_HELP`); ``train`` is the examples file of the
    formats that have no train split of their own (JSONL, Belebele, SIB-200)."""
    kind, _, rest = spec.partition(":")
    if kind == "milic":
        parts = rest.rsplit(":", 3)
        direction = _DIRECTION.fullmatch(parts[-1]) if len(parts) == 4 else None
        if direction is None:
            parts = rest.rsplit(":", 2)
        root, task, lang = [*parts, "", "", ""][:3]
        if not (root and task and lang):
            raise TaskError(f"write a MiLiC-Eval task as milic:ROOT:TASK:LANG[:SRC-TGT], got {spec!r}")
        if _DIRECTION.fullmatch(lang):
            raise TaskError(
                f"give the language folder, then the direction: milic:ROOT:{task}:LANG:{lang}, got {spec!r}"
            )
        source, target = direction.groups() if direction else (None, None)
        return load_milic(root, task, lang, source=source, target=target, settings=settings)
    if kind in ("belebele", "sib200"):
        path, _, lang = rest.rpartition(":")
        if not path or not lang:
            raise TaskError(f"write it as {kind}:FILE:LANG, got {spec!r}")
        loader = load_belebele if kind == "belebele" else load_sib200
        return loader(path, lang, train_path=train, settings=settings)
    path = Path(spec)
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise TaskError(f"task file not found: {path}")
        return load_jsonl(path, train_path=train, settings=settings)
    raise TaskError(
        f"unknown task {spec!r} (give FILE.jsonl, milic:ROOT:TASK:LANG[:SRC-TGT], belebele:FILE:LANG "
        "or sib200:FILE:LANG)"
    )


LOADERS: dict[str, Callable[..., TaskData]] = {
    "milic": load_milic,
    "belebele": load_belebele,
    "sib200": load_sib200,
    "jsonl": load_jsonl,
}


def load_task(fmt: str, *args: Any, **kwargs: Any) -> TaskData:
    """Dispatch to the reader of a format name in :data:`LOADERS`, passing the arguments through."""
    if fmt not in LOADERS:
        raise TaskError(f"unknown task format {fmt!r}; known: {', '.join(LOADERS)}")
    return LOADERS[fmt](*args, **kwargs)


__all__ = ["LOADERS", "SPEC_HELP", "load_spec", "load_task"]
