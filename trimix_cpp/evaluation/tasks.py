"""Readers that turn evaluation files into prompts with in-context examples, and their gold answers.

Formats read here:

* MiLiC-Eval, the authors' benchmark: ``<root>/<task>/<lang>/{train_1,train_2,train_3,dev,test}.json``,
  each a JSON list of records with an ``id`` (tasks and fields in :data:`MILIC_TASKS`; a folder named
  ``<task>_<variant>``, as distributed: ``translation_dialogue``, ``title_generation_200``, is that task);
* Belebele: JSONL records with ``flores_passage``, ``question``, ``mc_answer1``..``mc_answer4`` and
  ``correct_answer_num`` (1-4), read as four-option multiple choice;
* SIB-200: TSV with the header ``index_id category text``, read as topic classification;
* a plain JSONL task: ``{"input", "gold", "options"?, "id"?}``, generation, or multiple choice when a
  record has options.

Prompts follow the authors' English templates (all in :data:`TEMPLATES`): each block is an
instruction line, the item, and an answer cue; an in-context example is the same block followed by
its answer, and examples are separated by a blank line. The first ``shots`` records of the train
file are the examples (for classification, taken in turn from each label so every label is shown),
the same for every item, as in the authors' code. Candidate labels are listed in sorted order, so a
prompt is the same in every process (the authors' code lists them in the order of a Python set,
which changes from one process to the next). When a prompt budget is set and an item's prompt would
not fit, that item gets fewer examples, and :attr:`Item.n_shots` says how many; when it does not fit
with none, the passage of a title or classification item is cut further until it does
(:attr:`Item.cut_to`), since one long article must not stop a run.

:func:`load_spec` reads the one-string task specs of ``trimix eval`` (:data:`SPEC_HELP`).

A malformed record (a missing field, a wrong type, a line that is not JSON) does not stop reading: it
is skipped and reported as a :class:`RecordWarning` naming the file, the line (or the record index
of a JSON list) and the field. A file that cannot be read at all raises :class:`TaskError`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .fewshot import make_examples
from .fitting import clip, fit_prompt
from .items import Item, PromptSettings, RecordWarning, TaskData, TaskError
from .metrics import METRICS, Metric
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
from .templates import LETTERS, TEMPLATES, language_name, lettered

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
# Building prompts.


def _build(
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


def _load(
    task: str,
    spec: TaskFormat,
    read: Reader,
    paths: tuple[Path, Path | None],
    context: Context,
    common: Mapping[str, str],
    settings: PromptSettings,
) -> TaskData:
    path, train_path = paths
    warnings: list[RecordWarning] = []
    train: list[Parsed] = []
    if train_path is not None and (settings.shots > 0 or spec.labelled):
        train = parse_file(train_path, read, spec.parse, context, warnings)
    items = parse_file(path, read, spec.parse, context, warnings)
    return _build(task, spec, items, train, paths, common, settings, warnings)


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
    return _build(f"jsonl:{paths[0].stem}", spec, items, train, paths, common, settings, warnings)


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


__all__ = [
    "LOADERS",
    "MILIC_SPLITS",
    "MILIC_TASKS",
    "SPEC_HELP",
    "load_belebele",
    "load_jsonl",
    "load_milic",
    "load_sib200",
    "load_spec",
    "load_task",
    "milic_kind",
]
