"""Task metrics that score every script: accuracy, chrF++, ROUGE-L, and the answer-extraction rules.

The numbers follow MiLiC-Eval's own evaluation so that scores compare with the paper's:

* translation: chrF++ from sacrebleu, ``CHRF(word_order=2, lowercase=True)``, at corpus level;
* title generation: ROUGE-L F1 averaged over items;
* multiple choice: the answer letter is the first character of the (stripped) generation;
* math: the last number in the generation is compared with the gold number;
* classification: the generated label must equal the gold label, ignoring case.

Every score is on a 0-100 scale. Generations are cut at their first line before scoring, as the
authors do (their generation stops at the first newline).

ROUGE-L needs care. The ``rouge_score`` package's default tokenizer lowercases and then keeps only
``[a-z0-9]``, so a Tibetan, Uyghur, Kazakh or Mongolian title has no tokens at all and every pair
scores 0. Two tokenizers that keep every script are offered (:data:`ROUGE_TOKENIZERS`):

* ``xlsum`` (the default, :class:`XLSumTokenizer`): the tokenization of XL-Sum's multilingual ROUGE,
  which MiLiC-Eval scores its titles with, so scores compare with the paper's. It keeps symbols as
  tokens and splits digits from letters (``30يۈەن`` is two tokens), as OpenNMT's aggressive mode does.
* ``script`` (:class:`ScriptTokenizer`): runs of letters, marks and digits of any script, NFC
  normalised; symbols are dropped and ``30يۈەن`` stays one token. It needs no extra package.

Both separate Tibetan syllables at the tsheg (``་``) and shad (``།``) while keeping vowel signs and
subjoined letters inside their syllable.

sacrebleu, rouge-score and pyonmttok are imported when a metric is first computed, so reading task
files does not require them.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Hashable, Sequence
from functools import cache, lru_cache
from typing import Any, Literal, Protocol

from ..errors import TrimixError

Kind = Literal["generate", "choice", "math"]
Metric = Literal["chrf++", "rouge-l", "accuracy"]
RougeTokenizer = Literal["xlsum", "script"]

KINDS: tuple[Kind, ...] = ("generate", "choice", "math")
METRICS: tuple[Metric, ...] = ("chrf++", "rouge-l", "accuracy")
ROUGE_TOKENIZERS: tuple[RougeTokenizer, ...] = ("xlsum", "script")

# A number: an optional sign that is not a subtraction (no digit, letter or ")" right before it), then
# either digits grouped by commas in threes or plain digits, then an optional decimal part. ``\d``
# matches every script's decimal digits (Tibetan ༢, Arabic-Indic ٢, Mongolian ᠒), and float() reads them.
_NUMBER = re.compile(r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def _check_lengths(hyps: Sequence[Any], refs: Sequence[Any]) -> None:
    """A metric over nothing, or over lists that do not pair up, is a caller's bug: say so."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} predictions for {len(refs)} references")
    if not hyps:
        raise ValueError("no predictions to score")


def first_line(text: str) -> str:
    """The generation as the authors score it: leading/trailing space removed, then its first line."""
    stripped = text.strip()
    return stripped.split("\n", 1)[0].strip() if stripped else ""


def extract_choice(text: str, n_options: int) -> str | None:
    """The answer letter of a multiple-choice generation, or None.

    MiLiC-Eval reads the letter from the first character of a two-token generation: ``" B. yes"``
    answers B, while ``"The answer is B"`` answers nothing. Only the first ``n_options`` capital
    letters count, so a stray ``E`` on a four-option question is no answer rather than a wrong one.
    """
    if not 1 <= n_options <= 26:
        raise ValueError(f"n_options must be between 1 and 26, got {n_options}")
    head = text.lstrip()[:1]
    return head if head and head in string.ascii_uppercase[:n_options] else None


def last_number(text: str) -> float | None:
    """The last number in a math generation, or None when it has none.

    Handles signs (``-3``, but ``15-3`` is 15 then 3), decimals (``24.2``, a sentence's final full
    stop is not a decimal point), thousands separators (``1,234``) and decimal digits of any script.
    """
    found = _NUMBER.findall(text)
    if not found:
        return None
    return float(found[-1].replace(",", ""))


def accuracy(preds: Sequence[Hashable | None], golds: Sequence[Hashable]) -> float:
    """Percentage of predictions equal to their gold answer; a None prediction (no answer) is wrong."""
    _check_lengths(preds, golds)
    correct = sum(1 for p, g in zip(preds, golds) if p is not None and p == g)
    return 100.0 * correct / len(golds)


def chrf_pp(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus chrF++ (character 6-grams plus word 1-2-grams, beta 2, lowercased), 0-100.

    Corpus level means the n-gram statistics are summed over all pairs before the F-score, as in
    sacrebleu's ``corpus_score`` and the authors' evaluation; it is not the mean of sentence scores.
    """
    _check_lengths(hyps, refs)
    return float(_chrf().corpus_score(list(hyps), [list(refs)]).score)


@lru_cache(maxsize=1)
def _chrf() -> Any:
    try:
        from sacrebleu.metrics import CHRF
    except ImportError:
        raise TrimixError(_MISSING["chrf++"]) from None
    return CHRF(word_order=2, lowercase=True)


# The packages of the [eval] extra each metric imports, and the line that says how to get them.
_NEEDS: dict[str, tuple[str, ...]] = {"chrf++": ("sacrebleu",), "rouge-l": ("rouge_score",)}
_MISSING = {
    "chrf++": "chrF++ needs sacrebleu, which is not installed: pip install 'trimix[eval]' (or -e '.[eval]')",
    "rouge-l": "ROUGE-L needs rouge-score, which is not installed: pip install 'trimix[eval]' (or -e '.[eval]')",
}


def check_metric_available(metric: str) -> None:
    """Fail with one line naming the extra to install when ``metric`` needs a package that is
    missing: checked before an evaluation runs, not when it scores at the end."""
    import importlib

    for module in _NEEDS.get(metric, ()):
        try:
            importlib.import_module(module)
        except ImportError:
            raise TrimixError(_MISSING[metric]) from None


class ScriptTokenizer:
    """ROUGE tokens for any script: runs of letters, combining marks and digits, lowercased.

    Text is NFC-normalised (so a precomposed and a decomposed vowel sign compare equal), format
    characters such as ZWJ/ZWNJ and the Mongolian vowel separator are dropped without splitting the
    word they sit in, and everything else that is not a letter (L*), mark (M*) or number (N*) splits.
    That last rule is what makes Tibetan work: the tsheg U+0F0B and the shad U+0F0D are punctuation,
    while vowel signs (U+0F71..U+0F84) and subjoined letters (U+0F90..U+0FBC) are marks.
    """

    def tokenize(self, text: str) -> list[str]:
        """Split ``text`` into lowercase word (or Tibetan syllable) tokens."""
        tokens: list[str] = []
        current: list[str] = []
        for ch in unicodedata.normalize("NFC", text).lower():
            category = unicodedata.category(ch)
            if category == "Cf":
                continue
            if category[0] in "LMN":
                current.append(ch)
            elif current:
                tokens.append("".join(current))
                current = []
        if current:
            tokens.append("".join(current))
        return tokens


def _xlsum_punctuation(ch: str) -> bool:
    """XL-Sum's punctuation: every ASCII character that is not a letter, digit or space (``$``, ``+``,
    ``^`` too), and every character of a Unicode punctuation category (P*), which takes in the Tibetan
    tsheg and shad, the Arabic comma and question mark, and the Mongolian full stop."""
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _cjk_ideograph(cp: int) -> bool:
    """CJK ideographs, each of which XL-Sum's default path makes a token of its own."""
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


class XLSumTokenizer:
    """ROUGE tokens as XL-Sum's multilingual ROUGE makes them for a language without a segmenter.

    The steps, in order: lowercase; drop NUL, U+FFFD and every control, format, surrogate, private-use
    or unassigned character (category C*, so U+180E, the Mongolian vowel separator, and ZWNJ vanish
    without splitting their word) except tab and newlines, which are whitespace; split on whitespace
    and punctuation (:func:`_xlsum_punctuation`), dropping the punctuation; run OpenNMT's tokenizer in
    ``aggressive`` mode over the words joined by spaces, which splits letters from digits and from
    symbols (pyonmttok, the library XL-Sum uses); put each CJK ideograph on its own; split on spaces.
    No stemming, and no Unicode normalisation (XL-Sum does none).
    """

    def __init__(self) -> None:
        try:
            import pyonmttok
        except ImportError:
            raise TrimixError(
                "ROUGE-L with the xlsum tokenizer needs pyonmttok: pip install -e '.[eval]' "
                "(or score with {rouge_tokenizer} script)",
                param="rouge_tokenizer",
            ) from None
        self._aggressive = pyonmttok.Tokenizer("aggressive")

    def tokenize(self, text: str) -> list[str]:
        """Split ``text`` into lowercase tokens the way XL-Sum's ROUGE does."""
        cleaned: list[str] = []
        for ch in text.lower():
            if ch in "\t\n\r" or unicodedata.category(ch) == "Zs":
                cleaned.append(" ")
            elif ch in "\x00\ufffd" or unicodedata.category(ch).startswith("C"):
                continue
            elif _xlsum_punctuation(ch):
                cleaned.append(" ")
            else:
                cleaned.append(ch)
        words = "".join(cleaned).split()
        if not words:
            return []
        pieces, _ = self._aggressive.tokenize(" ".join(words))
        spaced = "".join(f" {ch} " if _cjk_ideograph(ord(ch)) else ch for ch in " ".join(pieces))
        return spaced.split()


def make_rouge_tokenizer(name: str) -> ScriptTokenizer | XLSumTokenizer:
    """The tokenizer named ``xlsum`` or ``script`` (see the module docstring for how they differ)."""
    if name == "xlsum":
        return XLSumTokenizer()
    if name == "script":
        return ScriptTokenizer()
    raise TrimixError(f"unknown ROUGE tokenizer {name!r}; choose {' or '.join(ROUGE_TOKENIZERS)}")


def rouge_l(hyps: Sequence[str], refs: Sequence[str], tokenizer: str = "xlsum") -> float:
    """ROUGE-L F1 averaged over pairs, 0-100, with the tokenizer named ``xlsum`` or ``script``.

    A pair where either side has no tokens scores 0, as in ``rouge_score``.
    """
    _check_lengths(hyps, refs)
    scorer = _rouge_scorer(tokenizer)
    total = sum(scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hyps, refs))
    return 100.0 * total / len(refs)


@cache
def _rouge_scorer(tokenizer: str) -> Any:
    made = make_rouge_tokenizer(tokenizer)
    try:
        from rouge_score.rouge_scorer import RougeScorer
    except ImportError:
        raise TrimixError(_MISSING["rouge-l"]) from None

    return RougeScorer(["rougeL"], tokenizer=made)


class Scorable(Protocol):
    """What :func:`score_outputs` needs of an item (``items.Item`` has it)."""

    @property
    def kind(self) -> str: ...

    @property
    def metric(self) -> str: ...

    @property
    def gold(self) -> str: ...

    @property
    def options(self) -> Sequence[str] | None: ...


def score_outputs(items: Sequence[Scorable], outputs: Sequence[str], rouge_tokenizer: str = "xlsum") -> float:
    """Score raw generations against a task's items with the task's metric and answer rule.

    All items must share one metric (a task has one). Each output is first cut to its first line.
    ``rouge_tokenizer`` names the tokenizer of ROUGE-L (``xlsum`` or ``script``).
    """
    _check_lengths(outputs, items)
    metrics = {item.metric for item in items}
    if len(metrics) != 1:
        raise ValueError(f"items of one task share one metric, got {sorted(metrics)}")
    metric = metrics.pop()
    lines = [first_line(o) for o in outputs]
    golds = [item.gold for item in items]
    if metric == "chrf++":
        return chrf_pp(lines, golds)
    if metric == "rouge-l":
        return rouge_l(lines, golds, rouge_tokenizer)
    if metric != "accuracy":
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    preds: list[Hashable | None] = []
    answers: list[Hashable] = []
    for item, line in zip(items, lines):
        if item.kind == "choice":
            preds.append(extract_choice(line, len(item.options or ())))
            answers.append(item.gold)
        elif item.kind == "math":
            preds.append(last_number(line))
            answers.append(float(item.gold))
        else:
            preds.append(line.lower())
            answers.append(item.gold.strip().lower())
    return accuracy(preds, answers)
