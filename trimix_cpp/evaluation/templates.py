"""The prompt format: every template, the language names they show, and how options are lettered.

A block (see :data:`TEMPLATES`) is an instruction line, the item, and an answer cue, as in the
authors' English templates. Everything that decides the text of a prompt apart from the records
themselves lives here or is counted by :data:`PROMPT_RULES`, so that :func:`prompt_format` can name
the format a run folder was written with and refuse to resume it under another.
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Sequence

LANGUAGE_NAMES: dict[str, str] = {
    # MiLiC-Eval's codes, then ISO 639-3 codes as FLORES, Belebele and SIB-200 use them (``bod_Tibt``).
    "bo": "Tibetan",
    "ug": "Uyghur",
    "kk": "Kazakh",
    "mn": "Mongolian",
    "en": "English",
    "zh": "Chinese",
    "bod": "Tibetan",
    "uig": "Uyghur",
    "kaz": "Kazakh",
    "khk": "Mongolian",
    "mvf": "Mongolian",
    "eng": "English",
    "zho": "Chinese",
    "ben": "Bengali",
    "tam": "Tamil",
    "tel": "Telugu",
    "ory": "Odia",
    "ori": "Odia",
}

# Every prompt block, by template name. A block ends with its answer cue; the authors leave a space
# after the cue of open generation ("English: ") and none after "Answer:", and an in-context
# example is the block with its answer after the cue, separated from it by exactly one space.
TEMPLATES: dict[str, str] = {
    "translation": (
        "Please translate the following {src_name} text into {tgt_name}.\n{src_name}: {source}\n{tgt_name}: "
    ),
    "title_generation": "Please write a title for the following article in {language}.\nArticle: {content}\nTitle: ",
    "text_classification": (
        "Please classify the following {language} text.\nText: {text}\nCandidate labels: {labels}\nAnswer:"
    ),
    "response_selection": (
        "Please select an appropriate response for the following {language} dialogue.\n"
        "Context:\n{context}\nOptions:\n{options}\nAnswer:"
    ),
    "reading_comprehension": (
        "Please read the following {language} dialogue and answer the question.\n"
        "Context:\n{context}\nQuestion: {question}\nOptions:\n{options}\nAnswer:"
    ),
    "math": (
        "Please solve the following {language} math problem step by step.\nProblem: {question}\nStep-by-step solution: "
    ),
    "belebele": (
        "Please read the following {language} passage and answer the question.\n"
        "Passage: {passage}\nQuestion: {question}\nOptions:\n{options}\nAnswer:"
    ),
    "sib200": (
        "Please classify the topic of the following {language} text.\nText: {text}\nCandidate labels: {labels}\nAnswer:"
    ),
    "plain": "{instruction}{input}",
    "plain_choice": "{instruction}{input}\nOptions:\n{options}\nAnswer:",
}

# The letters of multiple-choice options, A first; a record with more options than letters is refused.
LETTERS = string.ascii_uppercase

# Bumped whenever prompts change in a way TEMPLATES does not show (how examples are picked, how
# passages are cut, label order), so that a run folder is never resumed with other prompts.
PROMPT_RULES = 2


def prompt_format() -> str:
    """The identity of the prompt format: the rules' version and a digest of every template."""
    digest = hashlib.sha256(json.dumps(TEMPLATES, sort_keys=True).encode("utf-8")).hexdigest()[:12]
    return f"{PROMPT_RULES}:{digest}"


def language_name(code: str) -> str:
    """English name of a language code (``ug``, ``uig``, ``uig_Arab``); an unknown code is returned as is."""
    return LANGUAGE_NAMES.get(code, LANGUAGE_NAMES.get(code.split("_")[0], code))


def lettered(options: Sequence[str]) -> str:
    """Options one a line as ``A. text``: the answer of a multiple-choice item is read as that letter."""
    return "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))


__all__ = ["LANGUAGE_NAMES", "LETTERS", "PROMPT_RULES", "TEMPLATES", "language_name", "lettered", "prompt_format"]
