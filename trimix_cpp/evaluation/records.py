"""Records out of task files: each file format yields its records with their place, and a record is
parsed into the pieces of a prompt block or reported.

A malformed record (a missing field, a wrong type, a line that is not JSON) does not stop reading: the
parser raises :class:`BadRecord`, and :func:`parse_file` turns it into a :class:`RecordWarning`
naming the file, the line (or the record index of a JSON list) and the field, then goes on. A file
that cannot be read at all raises :class:`TaskError`. What each benchmark's records hold is its
reader's business (:mod:`.readers`); this module is what all of them share.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .items import RecordWarning, TaskError
from .metrics import Kind, Metric

# ---------------------------------------------------------------------------------------------------
# Reading files: each reader yields (where, record) and reports lines it cannot parse.


@dataclass(frozen=True)
class Where:
    """A record's place in its file, for warnings: the line of a JSONL or TSV file, the index in a JSON list."""

    line: int | None = None
    index: int | None = None


# A file format: reads a file, yields each record with its place, and appends a warning for a line it
# cannot parse (a file it cannot read at all raises TaskError).
Reader = Callable[[Path, list[RecordWarning]], Iterator[tuple[Where, Any]]]


class BadRecord(Exception):
    """A record field is missing or malformed; caught per record and turned into a warning."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _open_text(path: Path) -> str:
    if not path.is_file():
        raise TaskError(f"no task file {path}")
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise TaskError(f"cannot read task file {path} as UTF-8 text: {e}") from None


def read_json_list(path: Path, warnings: list[RecordWarning]) -> Iterator[tuple[Where, Any]]:
    """MiLiC-Eval's files: one JSON list; being a single document, a syntax error anywhere fails the file."""
    text = _open_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TaskError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise TaskError(f"{path} holds a JSON {type(data).__name__}; a task file is a JSON list of records")
    for i, record in enumerate(data):
        yield Where(index=i), record


def read_jsonl(path: Path, warnings: list[RecordWarning]) -> Iterator[tuple[Where, Any]]:
    """One JSON record a line (Belebele, plain tasks); a line that is not JSON is reported and skipped."""
    # Split on newlines only: str.splitlines() would also split at U+2028 or U+0085, which JSON allows
    # unescaped inside a string.
    for n, line in enumerate(_open_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            warnings.append(RecordWarning(str(path), None, f"not valid JSON ({e.msg}, column {e.colno})", line=n))
            continue
        yield Where(line=n), record


def tsv_reader(columns: Sequence[str]) -> Reader:
    """A reader of tab-separated files with a header (SIB-200) that refuses a file lacking one of ``columns``."""

    def read(path: Path, warnings: list[RecordWarning]) -> Iterator[tuple[Where, Any]]:
        rows = csv.DictReader(io.StringIO(_open_text(path), newline=""), delimiter="\t")
        missing = [c for c in columns if c not in (rows.fieldnames or ())]
        if missing:
            raise TaskError(f"{path}: the header has no column {', '.join(missing)} (expected {' '.join(columns)})")
        for row in rows:
            # line_num is the row's last physical line; the header is line 1.
            yield Where(line=rows.line_num), row

    return read


# ---------------------------------------------------------------------------------------------------
# Parsing records into the pieces of a prompt block.


@dataclass(frozen=True)
class Parsed:
    """A record reduced to what prompts need: template fields, gold, and the answer an example shows."""

    id: str
    fields: dict[str, str]
    gold: str
    shown: str
    options: tuple[str, ...] | None = None
    label: str | None = None
    where: Where = Where()
    cut: str | None = None  # the field that may be cut shorter to fit a prompt budget


@dataclass(frozen=True)
class Context:
    """What parsing needs beyond the record: the translation direction and the passage limit."""

    source: str
    target: str
    max_passage_chars: int


Parser = Callable[[Mapping[str, Any], Context], Parsed]


@dataclass(frozen=True)
class TaskFormat:
    """A format's rules: the template its blocks fill, how an answer is read and scored, and its parser."""

    template: str
    kind: Kind
    metric: Metric
    parse: Parser
    labelled: bool = False  # classification: candidate labels are collected and listed in the prompt


def warning_at(path: Path, where: Where, field_name: str | None, message: str) -> RecordWarning:
    """A warning about the record at ``where`` in ``path``."""
    return RecordWarning(str(path), field_name, message, line=where.line, index=where.index)


def parse_file(
    path: Path, read: Reader, parse: Parser, context: Context, warnings: list[RecordWarning]
) -> list[Parsed]:
    """Every well-formed record of a file; each other one becomes a warning. Ids must be unique."""
    parsed: list[Parsed] = []
    seen: set[str] = set()
    for where, record in read(path, warnings):
        if not isinstance(record, Mapping):
            warnings.append(warning_at(path, where, None, f"expected an object, got {type(record).__name__}"))
            continue
        try:
            p = parse(record, context)
        except BadRecord as bad:
            warnings.append(warning_at(path, where, bad.field, bad.message))
            continue
        # A record without an id of its own is named after its place in the file.
        ident = p.id or f"{path.stem}:{where.line if where.line is not None else where.index}"
        if ident in seen:
            warnings.append(warning_at(path, where, "id", f"duplicate id {ident!r}; the record is skipped"))
            continue
        seen.add(ident)
        parsed.append(replace(p, id=ident, where=where))
    return parsed


__all__ = [
    "BadRecord",
    "Context",
    "Parsed",
    "Parser",
    "Reader",
    "TaskFormat",
    "Where",
    "parse_file",
    "read_json_list",
    "read_jsonl",
    "tsv_reader",
    "warning_at",
]
