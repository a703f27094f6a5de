"""Metrics: values worked out by hand (in the comments), on Tibetan, Uyghur, Kazakh and English."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import pytest

from trimix_cpp.errors import TrimixError
from trimix_cpp.evaluation.metrics import (
    ScriptTokenizer,
    XLSumTokenizer,
    accuracy,
    chrf_pp,
    extract_choice,
    first_line,
    last_number,
    make_rouge_tokenizer,
    rouge_l,
    score_outputs,
)

needs_sacrebleu = pytest.mark.skipif(importlib.util.find_spec("sacrebleu") is None, reason="sacrebleu not installed")
needs_rouge = pytest.mark.skipif(importlib.util.find_spec("rouge_score") is None, reason="rouge-score not installed")
needs_onmt = pytest.mark.skipif(importlib.util.find_spec("pyonmttok") is None, reason="pyonmttok not installed")
# The two ROUGE tokenizers agree on the examples below (words of letters, split at punctuation).
BOTH = pytest.mark.parametrize("tok", ["script", pytest.param("xlsum", marks=needs_onmt)])

# "Tashi delek" (four syllables) and a shorter variant that drops the third syllable.
BO_REF = "བཀྲ་ཤིས་བདེ་ལེགས།"
BO_HYP = "བཀྲ་ཤིས་ལེགས།"


# --- answer extraction ---------------------------------------------------------------------------


def test_extract_choice_reads_the_first_character_after_leading_space() -> None:
    assert extract_choice("B", 4) == "B"
    assert extract_choice("  C. ཁྱེད་རང", 4) == "C"
    assert extract_choice("\nA", 4) == "A"
    assert extract_choice("E", 5) == "E"


def test_extract_choice_gives_none_for_anything_else() -> None:
    assert extract_choice("E", 4) is None  # only four options: E is no answer
    assert extract_choice("The answer is B", 4) is None  # the letter must come first
    assert extract_choice("b", 4) is None  # capital letters, as the authors compare
    assert extract_choice("", 4) is None
    assert extract_choice("   ", 4) is None
    assert extract_choice("ཀ", 4) is None
    with pytest.raises(ValueError):
        extract_choice("A", 0)


def test_last_number() -> None:
    assert last_number("12×1.60=19.2, 5+19.2=24.2. The answer is 24.2.") == 24.2  # final full stop is not a decimal
    assert last_number("The total is 1,234 yuan") == 1234.0
    assert last_number("1,234,567.5") == 1234567.5
    assert last_number("It fell to -5 degrees") == -5.0
    assert last_number("(-3)") == -3.0
    assert last_number("15-3=12") == 12.0
    assert last_number("15-3") == 3.0  # a minus right after a digit is a subtraction, not a sign
    assert last_number("ལན་ནི་༢༤ རེད།") == 24.0  # Tibetan digits two, four
    assert last_number("جاۋاب ٤٢") == 42.0  # Arabic-Indic digits
    assert last_number("no number here") is None
    assert last_number("") is None


def test_first_line() -> None:
    assert first_line("  B. yes\nC. no") == "B. yes"
    assert first_line("\n\n  ئۇيغۇر  \nmore") == "ئۇيغۇر"
    assert first_line("   ") == ""


def test_accuracy() -> None:
    assert accuracy(["A", "B", None, "D"], ["A", "C", "C", "D"]) == 50.0  # 2 of 4; None is wrong
    assert accuracy([24.0], [24.0]) == 100.0
    with pytest.raises(ValueError):
        accuracy(["A"], ["A", "B"])
    with pytest.raises(ValueError):
        accuracy([], [])


# --- tokenizer and ROUGE-L -----------------------------------------------------------------------


def test_tokenizer_splits_tibetan_at_tsheg_and_shad_only() -> None:
    tok = ScriptTokenizer()
    # ཀྲ has the subjoined ra U+0FB2, བདེ the vowel sign e U+0F7A, སྐུ a subjoined ka and vowel sign u:
    # marks stay inside their syllable.
    assert tok.tokenize(BO_REF) == ["བཀྲ", "ཤིས", "བདེ", "ལེགས"]
    assert tok.tokenize("སྐུ་གཟུགས་བདེ་པོ་ཡིན་པས། ") == ["སྐུ", "གཟུགས", "བདེ", "པོ", "ཡིན", "པས"]


def test_tokenizer_other_scripts() -> None:
    tok = ScriptTokenizer()
    assert tok.tokenize("ئۇيغۇر تىلى، ياخشى!") == ["ئۇيغۇر", "تىلى", "ياخشى"]  # Arabic comma U+060C splits
    assert tok.tokenize("ҚАЗАҚ Тілі — жақсы.") == ["қазақ", "тілі", "жақсы"]  # Cyrillic lowercased
    assert tok.tokenize("Hello, World 1,234.5") == ["hello", "world", "1", "234", "5"]
    # ZWNJ (a format character) is dropped without splitting the word it sits in.
    assert tok.tokenize("ab\u200ccd ef") == ["abcd", "ef"]
    # A decomposed vowel sign equals the precomposed one after NFC: é as e + U+0301.
    assert tok.tokenize("e\u0301t\u00e9") == ["\u00e9t\u00e9"]


@needs_rouge
@BOTH
def test_default_rouge_score_tokenizer_scores_tibetan_zero_and_ours_does_not(tok: str) -> None:
    from rouge_score.rouge_scorer import RougeScorer

    # The package's own tokenizer keeps only [a-z0-9]: no tokens at all, so even a perfect match is 0.
    assert RougeScorer(["rougeL"]).score(BO_REF, BO_REF)["rougeL"].fmeasure == 0.0
    assert rouge_l([BO_REF], [BO_REF], tok) == pytest.approx(100.0)


@needs_rouge
@BOTH
def test_rouge_l_tibetan_syllables(tok: str) -> None:
    # ref: བཀྲ ཤིས བདེ ལེགས (4), hyp: བཀྲ ཤིས ལེགས (3); LCS = བཀྲ ཤིས ལེགས = 3.
    # P = 3/3 = 1, R = 3/4, F = 2PR/(P+R) = 1.5/1.75 = 6/7.
    assert rouge_l([BO_HYP], [BO_REF], tok) == pytest.approx(600 / 7)


@needs_rouge
@BOTH
def test_rouge_l_uyghur_words(tok: str) -> None:
    ref = "مەن ئۇيغۇر تىلىنى ياخشى كۆرىمەن"  # "I like the Uyghur language": 5 words
    hyp = "مەن تىلىنى بەك ياخشى كۆرىمەن."  # "I like the language very much": 5 words, full stop dropped
    # LCS = مەن تىلىنى ياخشى كۆرىمەن = 4; P = 4/5, R = 4/5, F = 4/5.
    assert rouge_l([hyp], [ref], tok) == pytest.approx(80.0)


@needs_rouge
@BOTH
def test_rouge_l_english_and_mean_over_pairs(tok: str) -> None:
    # ref: the cat sat on the mat (6), hyp: the cat was on the mat (6); LCS = the cat on the mat = 5.
    # P = R = F = 5/6.
    assert rouge_l(["The cat was on the mat"], ["the cat sat on the mat"], tok) == pytest.approx(500 / 6)
    # Mean of the Tibetan 6/7 and the English 5/6: (36/42 + 35/42) / 2 = 71/84.
    both = rouge_l([BO_HYP, "The cat was on the mat"], [BO_REF, "the cat sat on the mat"], tok)
    assert both == pytest.approx(7100 / 84)


@needs_rouge
@BOTH
def test_rouge_l_kazakh_case_and_empty(tok: str) -> None:
    assert rouge_l(["ҚАЗАҚ ТІЛІ"], ["қазақ тілі"], tok) == pytest.approx(100.0)
    assert rouge_l([""], ["қазақ тілі"], tok) == 0.0  # no tokens: 0, not an error
    with pytest.raises(ValueError):
        rouge_l(["a"], [], tok)


# --- chrF++ --------------------------------------------------------------------------------------


@needs_sacrebleu
def test_chrf_pp_identical_is_100() -> None:
    assert chrf_pp([BO_REF, "ئۇيغۇر تىلى"], [BO_REF, "ئۇيغۇر تىلى"]) == pytest.approx(100.0)


@needs_sacrebleu
def test_chrf_pp_small_case_by_hand() -> None:
    # hyp "ab", ref "abc"; character orders 1..6, word orders 1..2, beta = 2; an order counts only when
    # both sides have n-grams of it (sacrebleu's effective order).
    #   char 1: hyp {a, b}, ref {a, b, c}, 2 match   P = 1, R = 2/3
    #   char 2: hyp {ab},   ref {ab, bc},  1 match   P = 1, R = 1/2
    #   char 3+: the hypothesis has none             (not counted)
    #   word 1: hyp {ab},   ref {abc},     0 match   P = 0, R = 0
    #   word 2: neither has a bigram                 (not counted)
    # mean P = (1 + 1 + 0)/3 = 2/3, mean R = (2/3 + 1/2 + 0)/3 = 7/18
    # F2 = 5PR / (4P + R) = (5 * 2/3 * 7/18) / (8/3 + 7/18) = (35/27) / (55/18) = 14/33
    assert chrf_pp(["ab"], ["abc"]) == pytest.approx(1400 / 33)
    assert chrf_pp(["AB"], ["abc"]) == pytest.approx(1400 / 33)  # lowercase=True


@needs_sacrebleu
def test_chrf_pp_is_corpus_level() -> None:
    # Add the pair ("x", "y"): char 1 gains hyp 1, ref 1, match 0; word 1 gains hyp 1, ref 1, match 0.
    #   char 1: 2/3 matched of hyp, 2/4 of ref   P = 2/3, R = 1/2
    #   char 2: unchanged                        P = 1,   R = 1/2
    #   word 1: 0 of 2                           P = 0,   R = 0
    # mean P = 5/9, mean R = 1/3; F2 = (5 * 5/9 * 1/3) / (20/9 + 1/3) = (25/27) / (23/9) = 25/69.
    # (The mean of sentence scores would be (42.42 + 0) / 2 = 21.2.)
    assert chrf_pp(["ab", "x"], ["abc", "y"]) == pytest.approx(2500 / 69)


# --- scoring items -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    kind: str
    metric: str
    gold: str
    options: tuple[str, ...] | None = None


def test_score_outputs_choice_math_and_labels() -> None:
    choice = [_Item("choice", "accuracy", "B", ("x", "y", "z")), _Item("choice", "accuracy", "C", ("x", "y", "z"))]
    assert score_outputs(choice, [" B. y", "D"]) == 50.0  # D is not an option of three
    math_items = [_Item("math", "accuracy", "24.2"), _Item("math", "accuracy", "18")]
    assert score_outputs(math_items, ["so 5+19.2=24.2.\nnext problem 7", "18.0"]) == 100.0  # first line only
    labels = [_Item("generate", "accuracy", "Sports"), _Item("generate", "accuracy", "Health")]
    assert score_outputs(labels, [" sports\n", "health care"]) == 50.0
    with pytest.raises(ValueError):
        score_outputs([choice[0], _Item("generate", "chrf++", "x")], ["A", "x"])


@needs_rouge
def test_score_outputs_rouge() -> None:
    assert score_outputs([_Item("generate", "rouge-l", BO_REF)], [BO_HYP + "\nmore"]) == pytest.approx(600 / 7)


# --- XL-Sum's tokenization (MiLiC-Eval's ROUGE) ---------------------------------------------------


@needs_onmt
def test_xlsum_tokenizer_tibetan_syllables() -> None:
    tok = XLSumTokenizer()
    # The tsheg U+0F0B and shad U+0F0D are punctuation (Po): they split and vanish; the subjoined ra
    # U+0FB2 and the vowel signs (Mn) stay inside their syllable.
    assert tok.tokenize(BO_REF) == ["བཀྲ", "ཤིས", "བདེ", "ལེགས"]
    assert tok.tokenize("སྐུ་གཟུགས་བདེ་པོ་ཡིན་པས། ") == ["སྐུ", "གཟུགས", "བདེ", "པོ", "ཡིན", "པས"]
    # Tibetan digits are numbers: aggressive mode splits them from the letters after them.
    assert tok.tokenize("ལོ་༢༠༢༣ལོར།") == ["ལོ", "༢༠༢༣", "ལོར"]


@needs_onmt
def test_xlsum_tokenizer_uyghur() -> None:
    tok = XLSumTokenizer()
    # The Arabic comma U+060C and question mark U+061F are punctuation; the hyphen is ASCII punctuation.
    assert tok.tokenize("ئۇيغۇر تىلى، ياخشىمۇ؟") == ["ئۇيغۇر", "تىلى", "ياخشىمۇ"]
    assert tok.tokenize("2023-يىلى") == ["2023", "يىلى"]
    # Digits and letters written together are two tokens (the script tokenizer keeps one).
    assert tok.tokenize("30يۈەن") == ["30", "يۈەن"]
    assert ScriptTokenizer().tokenize("30يۈەن") == ["30يۈەن"]
    # A symbol that is not ASCII (S*) is not punctuation: it stays, as a token of its own.
    assert tok.tokenize("¥50 ©") == ["¥", "50", "©"]
    # ASCII symbols count as punctuation.
    assert tok.tokenize("$50+3") == ["50", "3"]


@needs_onmt
def test_xlsum_tokenizer_mongolian_drops_the_vowel_separator() -> None:
    tok = XLSumTokenizer()
    # qar-a "black": U+182C U+1820 U+1837, the Mongolian vowel separator U+180E (a format character,
    # Cf), then U+1820. The separator is deleted without splitting the word.
    word = "\u182c\u1820\u1837\u180e\u1820"
    assert tok.tokenize(word) == ["\u182c\u1820\u1837\u1820"]
    # The free variation selector U+180B is a mark (Mn): it stays. The Mongolian full stop U+1803 splits.
    assert tok.tokenize("\u182e\u1823\u1829\u182d\u180b\u1823\u182f\u1803 \u182c\u1821") == [
        "\u182e\u1823\u1829\u182d\u180b\u1823\u182f",
        "\u182c\u1821",
    ]
    # ZWNJ (Cf) and a control character (Cc) vanish too; tab and newline are spaces.
    assert tok.tokenize("ab\u200ccd\x07ef\tgh\nij") == ["abcdef", "gh", "ij"]


@needs_onmt
def test_xlsum_tokenizer_lowercases_without_normalising_and_splits_cjk() -> None:
    tok = XLSumTokenizer()
    assert tok.tokenize("ҚАЗАҚ Тілі — жақсы.") == ["қазақ", "тілі", "жақсы"]
    assert tok.tokenize("维吾尔语 good") == ["维", "吾", "尔", "语", "good"]
    # No NFC: a decomposed é stays decomposed (XL-Sum does not normalise); the script tokenizer composes it.
    assert tok.tokenize("e\u0301t\u00e9") == ["e\u0301t\u00e9"]
    assert tok.tokenize("  ") == [] and tok.tokenize("") == []


@needs_rouge
@needs_onmt
def test_rouge_l_tokenizers_differ_where_digits_touch_letters() -> None:
    ref, hyp = "30 يۈەن", "30يۈەن"
    assert rouge_l([hyp], [ref], "xlsum") == pytest.approx(100.0)
    assert rouge_l([hyp], [ref], "script") == 0.0
    assert score_outputs([_Item("generate", "rouge-l", ref)], [hyp], "script") == 0.0
    assert score_outputs([_Item("generate", "rouge-l", ref)], [hyp]) == pytest.approx(100.0)  # xlsum by default


def test_unknown_rouge_tokenizer() -> None:
    with pytest.raises(TrimixError, match="unknown ROUGE tokenizer 'nltk'; choose xlsum or script"):
        make_rouge_tokenizer("nltk")
