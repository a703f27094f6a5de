"""The readers of each benchmark: MiLiC-Eval, Belebele, SIB-200 and plain JSONL tasks.

Formats read here:

* MiLiC-Eval, the authors' benchmark: ``<root>/<task>/<lang>/{train_1,train_2,train_3,dev,test}.json``,
  each a JSON list of records with an ``id`` (tasks and fields in :data:`MILIC_TASKS`; a folder named
  ``<task>_<variant>``, as distributed: ``translation_dialogue``, ``title_generation_200``, is that task);
* Belebele: JSONL records with ``flores_passage``, ``question``, ``mc_answer1``..``mc_answer4`` and
  ``correct_answer_num`` (1-4), read as four-option multiple choice;
* SIB-200: TSV with the header ``index_id category text``, read as topic classification;
* a plain JSONL task: ``{"input", "gold", "options"?, "id"?}``, generation, or multiple choice when a
  record has options.

A reader knows its format's fields: it parses each record into the pieces of a prompt block
(:class:`~.records.Parsed`) and hands them to :func:`~.prompts.build_task`, which makes the prompts
the same way for every format. Examples come from the train file (MiLiC-Eval's ``train_1``, or the
file given for the formats that have no train split).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from .fitting import clip
from .items import PromptSettings, RecordWarning, TaskData, TaskError
from .metrics import METRICS, Metric
from .prompts import build_task
from .records import (
    BadRecord,
    Context,
    Parsed,
    Reader,
    TaskFormat,
    parse_file,
    read_json_list,
    read_jsonl,
    tsv_reader,
    warning_at,
)
from .templates import LETTERS, language_name, lettered

MILIC_SPLITS = ("train_1", "train_2", "train_3", "dev", "test")

# ---------------------------------------------------------------------------------------------------
# Field access: each helper returns a clean value or raises BadRecord naming the field.


def _require(record: Mapping[str, Any], key: str) -> Any:
    if key not in record or record[key] is None:
        raise BadRecord(key, "missing")
    return record[key]


def _text(record: Mapping[str, Any], key: str) -> str:
    value = _require(record, key)
    if not isinstance(value, str):
        raise BadRecord(key, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRecord(key, "empty")
    return value


def _ident(record: Mapping[str, Any], key: str = "id") -> str:
    value = _require(record, key)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BadRecord(key, f"expected a string or an integer, got {type(value).__name__}")
    if isinstance(value, str) and not value.strip():
        raise BadRecord(key, "empty")
    return str(value)


def _texts(record: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = _require(record, key)
    if not isinstance(value, list) or not value:
        raise BadRecord(key, f"expected a non-empty list of strings, got {type(value).__name__}")
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise BadRecord(key, f"element {i} is a {type(v).__name__}, not a string")
    return tuple(value)


def _options(record: Mapping[str, Any], key: str = "options") -> tuple[str, ...]:
    options = _texts(record, key)
    if len(options) > len(LETTERS):
        raise BadRecord(key, f"{len(options)} options; at most {len(LETTERS)} can be lettered")
    return options


def _letter(record: Mapping[str, Any], key: str, n_options: int) -> str:
    value = _text(record, key).strip()
    if value not in LETTERS[:n_options]:
        raise BadRecord(key, f"expected one of {', '.join(LETTERS[:n_options])}, got {value!r}")
    return value


def _number(record: Mapping[str, Any], key: str) -> str:
    """A number as canonical text: ``18`` for 18 and 18.0, ``24.2`` for 24.2."""
    value = _require(record, key)
    if isinstance(value, bool):
        raise BadRecord(key, "expected a number, got bool")
    if isinstance(value, str):
        try:
            value = float(value.replace(",", "").strip())
        except ValueError:
            raise BadRecord(key, f"expected a number, got {value!r}") from None
    if not isinstance(value, (int, float)) or value != value or value in (float("inf"), float("-inf")):
        raise BadRecord(key, f"expected a finite number, got {value!r}")
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# ---------------------------------------------------------------------------------------------------
# Parsing records into the pieces of a prompt block.


def _parse_translation(r: Mapping[str, Any], c: Context) -> Parsed:
    target = _text(r, c.target)
    return Parsed(_ident(r), {"source": _text(r, c.source)}, gold=target, shown=target)


def _parse_title(r: Mapping[str, Any], c: Context) -> Parsed:
    title = _text(r, "title")
    content = clip(_text(r, "content"), c.max_passage_chars)
    return Parsed(_ident(r), {"content": content}, gold=title, shown=title, cut="content")


def _label_text(r: Mapping[str, Any]) -> str:
    label = _require(r, "label")
    if isinstance(label, str) and label.strip():
        return label.strip()
    if isinstance(label, dict) and isinstance(label.get("en"), str) and label["en"].strip():
        return label["en"].strip()
    raise BadRecord("label", 'expected {"en": "...", ...} or a string')


def _parse_classification(r: Mapping[str, Any], c: Context) -> Parsed:
    label = _label_text(r)
    text = clip(_text(r, "text"), c.max_passage_chars)
    return Parsed(_ident(r), {"text": text}, gold=label, shown=label, label=label, cut="text")


def _parse_dialogue_choice(r: Mapping[str, Any], c: Context, with_question: bool) -> Parsed:
    fields = {"context": "\n".join(_texts(r, "context"))}
    if with_question:
        fields["question"] = _text(r, "question")
    options = _options(r)
    fields["options"] = lettered(options)
    answer = _letter(r, "answer", len(options))
    return Parsed(_ident(r), fields, gold=answer, shown=answer, options=options)


def _parse_response(r: Mapping[str, Any], c: Context) -> Parsed:
    return _parse_dialogue_choice(r, c, with_question=False)


def _parse_comprehension(r: Mapping[str, Any], c: Context) -> Parsed:
    return _parse_dialogue_choice(r, c, with_question=True)


def _parse_math(r: Mapping[str, Any], c: Context) -> Parsed:
    answer = _number(r, "answer")
    shown = f"The answer is {answer}."
    if r.get("cot") is not None:
        # The authors' examples show a worked solution, in English under "en".
        cot = r["cot"]
        if isinstance(cot, dict):
            cot = cot.get("en")
        if not isinstance(cot, str) or not cot.strip():
            raise BadRecord("cot", 'expected a worked solution, a string or {"en": "...", ...}')
        shown = cot.strip()
    return Parsed(_ident(r), {"question": _text(r, "question")}, gold=answer, shown=shown)


def _parse_belebele(r: Mapping[str, Any], c: Context) -> Parsed:
    options = tuple(_text(r, f"mc_answer{i}") for i in range(1, 5))
    number = _require(r, "correct_answer_num")
    if isinstance(number, str) and number.strip().isdigit():
        number = int(number)
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= 4:
        raise BadRecord("correct_answer_num", f"expected 1, 2, 3 or 4, got {number!r}")
    fields = {
        "passage": _text(r, "flores_passage"),
        "question": _text(r, "question"),
        "options": lettered(options),
    }
    if "link" in r and "question_number" in r:
        ident = f"{r['link']}#{r['question_number']}"
    else:
        ident = _ident(r) if "id" in r else ""
    return Parsed(ident, fields, gold=LETTERS[number - 1], shown=LETTERS[number - 1], options=options)


def _parse_sib(r: Mapping[str, Any], c: Context) -> Parsed:
    if None in r:
        raise BadRecord(None, "more columns than the header")
    label = _text(r, "category").strip()
    text = clip(_text(r, "text"), c.max_passage_chars)
    return Parsed(_ident(r, "index_id"), {"text": text}, gold=label, shown=label, label=label, cut="text")


def _parse_plain(r: Mapping[str, Any], c: Context) -> Parsed:
    fields = {"input": _text(r, "input")}
    ident = _ident(r) if "id" in r else ""
    if r.get("options") is None:
        gold = _text(r, "gold")
        return Parsed(ident, fields, gold=gold, shown=gold)
    options = _options(r)
    fields["options"] = lettered(options)
    gold = _text(r, "gold").strip()
    if gold not in LETTERS[: len(options)]:
        if gold not in options:
            raise BadRecord("gold", f"neither a letter A-{LETTERS[len(options) - 1]} nor one of the options: {gold!r}")
        gold = LETTERS[options.index(gold)]
    return Parsed(ident, fields, gold=gold, shown=gold, options=options)


# ---------------------------------------------------------------------------------------------------
# Each format's template, answer rule, metric and parser.


MILIC_TASKS: dict[str, TaskFormat] = {
    "translation": TaskFormat("translation", "generate", "chrf++", _parse_translation),
    "title_generation": TaskFormat("title_generation", "generate", "rouge-l", _parse_title),
    "text_classification": TaskFormat(
        "text_classification", "generate", "accuracy", _parse_classification, labelled=True
    ),
    "response_selection": TaskFormat("response_selection", "choice", "accuracy", _parse_response),
    "reading_comprehension": TaskFormat("reading_comprehension", "choice", "accuracy", _parse_comprehension),
    "math": TaskFormat("math", "math", "accuracy", _parse_math),
}
_BELEBELE = TaskFormat("belebele", "choice", "accuracy", _parse_belebele)
_SIB200 = TaskFormat("sib200", "generate", "accuracy", _parse_sib, labelled=True)
_PLAIN = TaskFormat("plain", "generate", "chrf++", _parse_plain)
_PLAIN_CHOICE = TaskFormat("plain_choice", "choice", "accuracy", _parse_plain)


# ---------------------------------------------------------------------------------------------------
# Reading a task: its train file (for examples and labels), its items, then the prompts.


def _load(
    task: str,
    spec: TaskFormat,
    read: Reader,
    paths: tuple[Path, Path | None],
    context: Context,
    common: Mapping[str, str],
    settings: PromptSettings,
) -> TaskData:
    """A task whose records all have one format; the train file is read only when examples or labels
    come from it."""
    path, train_path = paths
    warnings: list[RecordWarning] = []
    train: list[Parsed] = []
    if train_path is not None and (settings.shots > 0 or spec.labelled):
        train = parse_file(train_path, read, spec.parse, context, warnings)
    items = parse_file(path, read, spec.parse, context, warnings)
    return build_task(task, spec, items, train, paths, common, settings, warnings)


# ---------------------------------------------------------------------------------------------------
# Public readers.


def milic_kind(task: str) -> str:
    """The task kind (a key of :data:`MILIC_TASKS`) of a MiLiC-Eval folder name: the kind itself, or
    the kind followed by ``_`` and a variant, as the benchmark is distributed (``translation_dialogue``,
    ``title_generation_200``)."""
    for kind in sorted(MILIC_TASKS, key=len, reverse=True):
        if task == kind or task.startswith(kind + "_"):
            return kind
    raise TaskError(
        f"unknown MiLiC-Eval task {task!r}; known: {', '.join(MILIC_TASKS)} "
        "(or a folder named after one of them, such as translation_dialogue)"
    )


def load_milic(
    root: str | Path,
    task: str,
    lang: str,
    *,
    split: str = "test",
    train_split: str = "train_1",
    source: str | None = None,
    target: str | None = None,
    settings: PromptSettings | None = None,
) -> TaskData:
    """A MiLiC-Eval task: ``<root>/<task>/<lang>/<split>.json`` with examples from ``train_split``.

    ``task`` is a folder name (see :func:`milic_kind`). For translation, ``source`` and ``target``
    are the record keys (language codes) to translate from and into; the default is ``lang`` into
    English (the paper's ENG-G task), and ``source="en"`` alone means English into ``lang`` (LRL-G).
    With ``settings.shots == 0`` no train file is needed, except that classification takes its
    candidate labels from it when it exists (from the evaluated split otherwise).
    """
    settings = settings or PromptSettings()
    kind = milic_kind(task)
    if kind != "translation" and (source or target):
        raise TaskError(f"a translation direction is for translation tasks only, not {task!r}")
    for s in (split, train_split):
        if s not in MILIC_SPLITS:
            raise TaskError(f"unknown split {s!r}; MiLiC-Eval has {', '.join(MILIC_SPLITS)}")
    folder = Path(root) / task / lang
    path = folder / f"{split}.json"
    if not path.is_file():
        raise TaskError(f"no file {path}; MiLiC-Eval files are <root>/<task>/<lang>/<split>.json")
    train_file = folder / f"{train_split}.json"
    if not train_file.is_file() and settings.shots > 0:
        raise TaskError(f"no train file {train_file} for {settings.shots} in-context examples (or use shots=0)")
    train_path = train_file if train_file.is_file() else None

    source = source or lang
    target = target or ("en" if source == lang else lang)
    if source == target:
        raise TaskError(f"translation from {source!r} into itself; give two different languages (e.g. ug-en)")
    context = Context(source, target, settings.max_passage_chars)
    common = {"language": language_name(lang), "src_name": language_name(source), "tgt_name": language_name(target)}
    name = f"{task}:{source}-{target}" if kind == "translation" else f"{task}:{lang}"
    return _load(name, MILIC_TASKS[kind], read_json_list, (path, train_path), context, common, settings)


def load_belebele(
    path: str | Path,
    language: str,
    *,
    train_path: str | Path | None = None,
    settings: PromptSettings | None = None,
) -> TaskData:
    """A Belebele JSONL file as four-option multiple choice (gold letter A-D).

    Belebele has no train split: examples come from ``train_path`` (for instance records of the
    same language held out of the evaluation), or there are none. ``language`` is a code
    (``bod_Tibt``, ``uig``) or an English name, used in the instruction line.
    """
    return _load_file(f"belebele:{language}", _BELEBELE, read_jsonl, path, train_path, language, settings)


def load_sib200(
    path: str | Path,
    language: str,
    *,
    train_path: str | Path | None = None,
    settings: PromptSettings | None = None,
) -> TaskData:
    """A SIB-200 TSV file as topic classification; the candidate topics come from ``train_path``."""
    read = tsv_reader(("index_id", "category", "text"))
    return _load_file(f"sib200:{language}", _SIB200, read, path, train_path, language, settings)


def _load_file(
    task: str,
    spec: TaskFormat,
    read: Reader,
    path: str | Path,
    train_path: str | Path | None,
    language: str,
    settings: PromptSettings | None,
) -> TaskData:
    settings = settings or PromptSettings()
    context = Context("", "", settings.max_passage_chars)
    paths = (Path(path), Path(train_path) if train_path is not None else None)
    return _load(task, spec, read, paths, context, {"language": language_name(language)}, settings)


def load_jsonl(
    path: str | Path,
    *,
    train_path: str | Path | None = None,
    instruction: str | None = None,
    metric: Metric = "chrf++",
    settings: PromptSettings | None = None,
) -> TaskData:
    """A plain JSONL task of ``{"input", "gold", "options"?, "id"?}`` records.

    The first well-formed record decides the task's kind: with ``options`` it is multiple choice
    (``gold`` a letter or one of the option texts) scored by accuracy, without it generation scored
    by ``metric``; records of the other kind are skipped with a warning, since one task has one
    metric. ``input`` should end with its own answer cue (``"...\\nEnglish:"``); ``instruction``, when
    given, is a first line added to every block. A record without an id is named ``<file stem>:<line>``.
    """
    settings = settings or PromptSettings()
    if metric not in METRICS:
        raise TaskError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    paths = (Path(path), Path(train_path) if train_path is not None else None)
    context = Context("", "", settings.max_passage_chars)
    warnings: list[RecordWarning] = []
    train: list[Parsed] = []
    if paths[1] is not None and settings.shots > 0:
        train = parse_file(paths[1], read_jsonl, _parse_plain, context, warnings)
    items = parse_file(paths[0], read_jsonl, _parse_plain, context, warnings)
    choice = bool(items) and items[0].options is not None
    spec = _PLAIN_CHOICE if choice else replace(_PLAIN, metric=metric)

    def same_kind(records: list[Parsed], file: Path) -> list[Parsed]:
        kept = []
        for p in records:
            if (p.options is not None) == choice:
                kept.append(p)
            else:
                message = "this task is " + ("multiple choice" if choice else "generation") + "; the record is skipped"
                warnings.append(warning_at(file, p.where, "options", message))
        return kept

    items = same_kind(items, paths[0])
    train = same_kind(train, paths[1]) if paths[1] is not None else []
    common = {"instruction": f"{instruction}\n" if instruction else ""}
    return build_task(f"jsonl:{paths[0].stem}", spec, items, train, paths, common, settings, warnings)


__all__ = ["MILIC_SPLITS", "MILIC_TASKS", "load_belebele", "load_jsonl", "load_milic", "load_sib200", "milic_kind"]
