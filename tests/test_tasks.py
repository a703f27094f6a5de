"""Task readers: prompts hold the examples and the item, budgets drop examples, bad records are reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trimix_cpp.errors import TrimixError
from trimix_cpp.evaluation.items import PromptSettings, RecordWarning, TaskData, TaskError, check_limit
from trimix_cpp.evaluation.metrics import score_outputs
from trimix_cpp.evaluation.readers import load_belebele, load_jsonl, load_milic, load_sib200, milic_kind
from trimix_cpp.evaluation.tasks import load_spec, load_task
from trimix_cpp.evaluation.templates import language_name

UG_TRAIN = [
    {"id": "t1", "ug": "سالام", "en": "Hello", "zh": "你好"},
    {"id": "t2", "ug": "رەھمەت", "en": "Thank you", "zh": "谢谢"},
]
UG_TEST = [
    {"id": "q1", "ug": "خەير خوش", "en": "Goodbye", "zh": "再见"},
    {"id": 7, "ug": "ياخشىمۇسىز", "en": "How are you", "zh": "你好吗"},
]


def write_milic(root: Path, task: str, lang: str, split: str, records: list) -> Path:
    path = root / task / lang / f"{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def fields_of(warnings: tuple[RecordWarning, ...]) -> list[str | None]:
    return [w.field for w in warnings]


# --- MiLiC-Eval ----------------------------------------------------------------------------------


def test_translation_prompt_is_the_authors_template(tmp_path: Path) -> None:
    write_milic(tmp_path, "translation", "ug", "train_1", UG_TRAIN)
    write_milic(tmp_path, "translation", "ug", "test", UG_TEST)
    data = load_milic(tmp_path, "translation", "ug")
    assert data.task == "translation:ug-en"
    assert data.warnings == ()
    first = data.items[0]
    assert first.prompt == (
        "Please translate the following Uyghur text into English.\nUyghur: سالام\nEnglish: Hello\n\n"
        "Please translate the following Uyghur text into English.\nUyghur: رەھمەت\nEnglish: Thank you\n\n"
        "Please translate the following Uyghur text into English.\nUyghur: خەير خوش\nEnglish: "
    )
    assert (first.id, first.gold, first.kind, first.metric, first.options) == (
        "q1",
        "Goodbye",
        "generate",
        "chrf++",
        None,
    )
    assert first.n_shots == 2 and first.shot_ids == ("t1", "t2")  # only two train records for shots=5
    assert data.items[1].id == "7"  # integer ids become strings
    assert [e.id for e in data.examples] == ["t1", "t2"]


def test_translation_from_english(tmp_path: Path) -> None:
    write_milic(tmp_path, "translation", "ug", "train_1", UG_TRAIN)
    write_milic(tmp_path, "translation", "ug", "test", UG_TEST)
    data = load_milic(tmp_path, "translation", "ug", source="en", settings=PromptSettings(shots=1))
    assert data.task == "translation:en-ug"
    item = data.items[0]
    assert item.gold == "خەير خوش"
    assert item.prompt.startswith(
        "Please translate the following English text into Uyghur.\nEnglish: Hello\nUyghur: سالام\n\n"
    )
    assert item.prompt.endswith("English: Goodbye\nUyghur: ")
    assert item.n_shots == 1


def test_title_generation_cuts_content_without_splitting_a_syllable(tmp_path: Path) -> None:
    # The first characters are བ ཀ ྲ ་ ཤ ི ས ་ བ ད ེ: a cut after 10 would part ད from its vowel sign ེ.
    content = "བཀྲ་ཤིས་བདེ་ལེགས།"
    write_milic(tmp_path, "title_generation", "bo", "train_1", [{"id": "a", "content": "ཀ་ཁ", "title": "ཀ"}])
    write_milic(tmp_path, "title_generation", "bo", "test", [{"id": "b", "content": content, "title": "བཀྲ་ཤིས"}])
    data = load_milic(tmp_path, "title_generation", "bo", settings=PromptSettings(max_passage_chars=10))
    item = data.items[0]
    assert "Article: བཀྲ་ཤིས་བ\nTitle: " in item.prompt  # backed off to 9 characters, before ད + ེ
    assert item.prompt.startswith(
        "Please write a title for the following article in Tibetan.\nArticle: ཀ་ཁ\nTitle: ཀ\n\n"
    )
    assert (item.gold, item.metric) == ("བཀྲ་ཤིས", "rouge-l")


def test_classification_labels_from_train_and_examples_cover_labels(tmp_path: Path) -> None:
    train = [
        {"id": "1", "text": "ཆུ་", "label": {"en": "nature", "zh": "自然"}},
        {"id": "2", "text": "རི་", "label": {"en": "nature", "zh": "自然"}},
        {"id": "3", "text": "སློབ་གྲྭ་", "label": {"en": "education", "zh": "教育"}},
    ]
    test = [
        {"id": "x", "text": "དཔེ་ཆ་", "label": {"en": "education", "zh": "教育"}},
        {"id": "y", "text": "རྩེད་མོ་", "label": {"en": "sports", "zh": "体育"}},
    ]
    write_milic(tmp_path, "text_classification", "bo", "train_1", train)
    write_milic(tmp_path, "text_classification", "bo", "test", test)
    data = load_milic(tmp_path, "text_classification", "bo", settings=PromptSettings(shots=2))
    # One example of each label first (1 then 3), not the first two records (both "nature").
    assert [e.id for e in data.examples] == ["1", "3"]
    item = data.items[0]
    assert item.options == ("education", "nature")  # sorted, the same in every process
    assert item.prompt.count("Candidate labels: education, nature\n") == 3
    assert item.prompt.endswith(
        "Please classify the following Tibetan text.\nText: དཔེ་ཆ་\nCandidate labels: education, nature\nAnswer:"
    )
    assert "Text: སློབ་གྲྭ་\nCandidate labels: education, nature\nAnswer: education\n\n" in item.prompt
    assert (item.gold, item.kind, item.metric) == ("education", "generate", "accuracy")
    # "sports" is in no train record: kept, and reported.
    [warning] = data.warnings
    assert warning.field == "label" and warning.index == 1 and "sports" in warning.message
    assert str(warning).startswith(str(tmp_path / "text_classification" / "bo" / "test.json") + " record [1]")


def test_response_selection_and_reading_comprehension(tmp_path: Path) -> None:
    rs = {"id": "r", "context": ["ཁྱེད་རང་སྐུ་གཟུགས་བདེ་པོ་ཡིན་པས།"], "options": ["ལགས་སོ།", "མིན།", "ཡག་པོ་ཡིན།"], "answer": "C"}
    write_milic(tmp_path, "response_selection", "bo", "train_1", [rs])
    write_milic(tmp_path, "response_selection", "bo", "test", [dict(rs, id="r2", answer="A")])
    item = load_milic(tmp_path, "response_selection", "bo").items[0]
    assert item.prompt.endswith(
        "Please select an appropriate response for the following Tibetan dialogue.\n"
        "Context:\nཁྱེད་རང་སྐུ་གཟུགས་བདེ་པོ་ཡིན་པས།\nOptions:\nA. ལགས་སོ།\nB. མིན།\nC. ཡག་པོ་ཡིན།\nAnswer:"
    )
    assert "\nAnswer: C\n\n" in item.prompt
    assert (item.gold, item.kind, item.options) == ("A", "choice", ("ལགས་སོ།", "མིན།", "ཡག་པོ་ཡིན།"))

    rc = {"id": "c", "context": ["A: سالام", "B: ۋەئەلەيكۇم ئەسسالام"], "question": "B نېمە دېدى؟",
          "options": ["سالام", "خوش"], "answer": "A"}  # fmt: skip
    write_milic(tmp_path, "reading_comprehension", "ug", "train_1", [rc])
    write_milic(tmp_path, "reading_comprehension", "ug", "test", [dict(rc, id="c2", answer="B")])
    item = load_milic(tmp_path, "reading_comprehension", "ug").items[0]
    assert item.prompt.endswith(
        "Please read the following Uyghur dialogue and answer the question.\n"
        "Context:\nA: سالام\nB: ۋەئەلەيكۇم ئەسسالام\nQuestion: B نېمە دېدى؟\nOptions:\nA. سالام\nB. خوش\nAnswer:"
    )
    assert item.gold == "B"


def test_math_gold_and_worked_examples(tmp_path: Path) -> None:
    train = [
        {"id": "m1", "question": "༣ + ༤ = ?", "answer": 7, "cot": {"en": "3 + 4 = 7. The answer is 7", "zh": "…"}},
        {"id": "m2", "question": "༢ × ༥ = ?", "answer": 10.0},
    ]
    test = [
        {"id": "m3", "question": "12 × 1.6 + 5 = ?", "answer": 24.2},
        {"id": "m4", "question": "?", "answer": "1,200"},
    ]
    write_milic(tmp_path, "math", "bo", "train_1", train)
    write_milic(tmp_path, "math", "bo", "test", test)
    data = load_milic(tmp_path, "math", "bo")
    item = data.items[0]
    assert item.prompt.startswith(
        "Please solve the following Tibetan math problem step by step.\nProblem: ༣ + ༤ = ?\n"
        "Step-by-step solution: 3 + 4 = 7. The answer is 7\n\n"
    )
    assert "Step-by-step solution: The answer is 10.\n\n" in item.prompt  # no worked solution given
    assert item.prompt.endswith("Problem: 12 × 1.6 + 5 = ?\nStep-by-step solution: ")
    assert [(i.gold, i.kind) for i in data.items] == [("24.2", "math"), ("1200", "math")]
    assert score_outputs(data.items, ["12×1.6=19.2, 19.2+5=24.2.", "1,200"]) == 100.0


def test_budget_drops_examples_per_item(tmp_path: Path) -> None:
    write_milic(tmp_path, "translation", "ug", "train_1", UG_TRAIN)
    write_milic(tmp_path, "translation", "ug", "test", UG_TEST)
    full = load_milic(tmp_path, "translation", "ug").items
    one_shot = len(full[0].prompt) - len(UG_TRAIN[1]["ug"]) - 5  # too short for two examples
    data = load_milic(tmp_path, "translation", "ug", settings=PromptSettings(max_prompt=one_shot))
    item = data.items[0]
    assert len(item.prompt) <= one_shot
    assert item.n_shots == 1 and item.shot_ids == ("t1",)
    assert "English: Hello\n\n" in item.prompt and "Thank you" not in item.prompt
    assert item.prompt.endswith("Uyghur: خەير خوش\nEnglish: ")
    assert data.warnings == ()


def test_token_budget_uses_the_given_counter(tmp_path: Path) -> None:
    write_milic(tmp_path, "translation", "ug", "train_1", UG_TRAIN)
    write_milic(tmp_path, "translation", "ug", "test", UG_TEST[:1])
    calls: list[str] = []

    def words(text: str) -> int:
        calls.append(text)
        return len(text.split())

    # A budget of one word more than the bare item block leaves room for no example (each adds several).
    block_words = len(
        load_milic(tmp_path, "translation", "ug", settings=PromptSettings(shots=0)).items[0].prompt.split()
    )
    settings = PromptSettings(max_prompt=block_words + 1, count_tokens=words)
    data = load_milic(tmp_path, "translation", "ug", settings=settings)
    assert data.items[0].n_shots == 0 and data.items[0].shot_ids == ()
    assert len(calls) == 3  # tried 2 examples, then 1, then 0
    assert data.warnings == ()


def test_budget_too_small_for_the_item_alone_is_reported(tmp_path: Path) -> None:
    write_milic(tmp_path, "translation", "ug", "train_1", UG_TRAIN)
    path = write_milic(tmp_path, "translation", "ug", "test", UG_TEST[:1])
    data = load_milic(tmp_path, "translation", "ug", settings=PromptSettings(max_prompt=10))
    assert data.items[0].n_shots == 0
    [warning] = data.warnings
    assert warning.path == str(path) and warning.index == 0 and "budget of 10" in warning.message


def test_malformed_json_records_are_reported_and_skipped(tmp_path: Path) -> None:
    write_milic(tmp_path, "translation", "ug", "train_1", [*UG_TRAIN, {"id": "t3", "ug": "ھە"}])
    test = [
        UG_TEST[0],
        {"id": "q2", "ug": 5, "en": "five"},  # wrong type
        "not a record",
        {"ug": "ھەئە", "en": "Yes"},  # no id
        {"id": "q1", "ug": "ياق", "en": "No"},  # duplicate id
        {"id": "q6", "ug": "ياق", "en": "   "},  # empty answer
        UG_TEST[1],
    ]
    test_path = write_milic(tmp_path, "translation", "ug", "test", test)
    data = load_milic(tmp_path, "translation", "ug")
    assert [i.id for i in data.items] == ["q1", "7"]
    train_path = str(tmp_path / "translation" / "ug" / "train_1.json")
    got = [(w.path, w.index, w.field) for w in data.warnings]
    assert got == [
        (train_path, 2, "en"),
        (str(test_path), 1, "ug"),
        (str(test_path), 2, None),
        (str(test_path), 3, "id"),
        (str(test_path), 4, "id"),
        (str(test_path), 5, "en"),
    ]
    assert "expected a string, got int" in data.warnings[1].message
    assert "missing" in data.warnings[0].message and "duplicate" in data.warnings[4].message
    assert str(data.warnings[1]) == f"{test_path} record [1]: field 'ug': expected a string, got int"


def test_bad_answer_letter_is_reported(tmp_path: Path) -> None:
    rec = {"id": "r", "context": ["ཀ"], "options": ["ཁ", "ག"], "answer": "C"}
    write_milic(tmp_path, "response_selection", "bo", "test", [rec])
    data = load_milic(tmp_path, "response_selection", "bo", settings=PromptSettings(shots=0))
    assert data.items == ()
    [w] = data.warnings
    assert (w.index, w.field) == (0, "answer") and "one of A, B" in w.message


def test_missing_files_and_unknown_task_raise(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="unknown MiLiC-Eval task"):
        load_milic(tmp_path, "poetry", "bo")
    with pytest.raises(TaskError, match="no file"):
        load_milic(tmp_path, "math", "bo")
    write_milic(tmp_path, "math", "bo", "test", [{"id": "1", "question": "?", "answer": 1}])
    with pytest.raises(TaskError, match="train file"):
        load_milic(tmp_path, "math", "bo")
    assert len(load_milic(tmp_path, "math", "bo", settings=PromptSettings(shots=0)).items) == 1
    (tmp_path / "math" / "bo" / "dev.json").write_text('[{"id": 1,}]', encoding="utf-8")
    with pytest.raises(TrimixError, match=r"dev\.json:1:11: not valid JSON"):
        load_milic(tmp_path, "math", "bo", split="dev", settings=PromptSettings(shots=0))


# --- Belebele, SIB-200, plain JSONL --------------------------------------------------------------


def belebele_record(n: int, answer: object) -> str:
    return json.dumps(
        {
            "link": "https://example.org/a",
            "question_number": n,
            "flores_passage": "བོད་ཀྱི་ལོ་རྒྱུས།",
            "question": "ག་རེ་རེད།",
            "mc_answer1": "ཀ",
            "mc_answer2": "ཁ",
            "mc_answer3": "ག",
            "mc_answer4": "ང",
            "correct_answer_num": answer,
            "dialect": "bod_Tibt",
        },
        ensure_ascii=False,
    )


def test_belebele(tmp_path: Path) -> None:
    train = write_lines(tmp_path / "train.jsonl", [belebele_record(1, "3")])
    path = write_lines(
        tmp_path / "bod_Tibt.jsonl",
        [belebele_record(2, "2"), "{not json", "", belebele_record(3, 5), belebele_record(4, 4)],
    )
    data = load_belebele(path, "bod_Tibt", train_path=train)
    assert data.task == "belebele:bod_Tibt"
    assert [(i.id, i.gold) for i in data.items] == [("https://example.org/a#2", "B"), ("https://example.org/a#4", "D")]
    item = data.items[0]
    assert item.options == ("ཀ", "ཁ", "ག", "ང") and item.kind == "choice" and item.n_shots == 1
    assert item.prompt == (
        "Please read the following Tibetan passage and answer the question.\nPassage: བོད་ཀྱི་ལོ་རྒྱུས།\n"
        "Question: ག་རེ་རེད།\nOptions:\nA. ཀ\nB. ཁ\nC. ག\nD. ང\nAnswer: C\n\n"
        "Please read the following Tibetan passage and answer the question.\nPassage: བོད་ཀྱི་ལོ་རྒྱུས།\n"
        "Question: ག་རེ་རེད།\nOptions:\nA. ཀ\nB. ཁ\nC. ག\nD. ང\nAnswer:"
    )
    assert [(w.path, w.line, w.field) for w in data.warnings] == [
        (str(path), 2, None),
        (str(path), 4, "correct_answer_num"),
    ]
    assert "not valid JSON" in data.warnings[0].message
    assert str(data.warnings[1]).startswith(f"{path}:4: field 'correct_answer_num'")


def test_sib200(tmp_path: Path) -> None:
    header = "index_id\tcategory\ttext"
    train = write_lines(
        tmp_path / "train.tsv",
        [header, "1\tsports\tتوپ ئويۇنى", "2\thealth\tساغلاملىق", "3\tsports\tيۈگۈرۈش"],
    )
    path = write_lines(
        tmp_path / "test.tsv",
        [header, '10\thealth\t"دوختۇر ""ياخشى"""', "11\tsports", "12\ttravel\tساياھەت"],
    )
    data = load_sib200(path, "uig_Arab", train_path=train, settings=PromptSettings(shots=2))
    assert [(i.id, i.gold) for i in data.items] == [("10", "health"), ("12", "travel")]
    item = data.items[0]
    assert item.options == ("health", "sports")
    assert item.prompt.endswith(
        "Please classify the topic of the following Uyghur text.\n"
        'Text: دوختۇر "ياخشى"\nCandidate labels: health, sports\nAnswer:'
    )
    assert "Text: توپ ئويۇنى\nCandidate labels: health, sports\nAnswer: sports\n\n" in item.prompt
    assert [(w.line, w.field) for w in data.warnings] == [(3, "text"), (4, "label")]

    write_lines(tmp_path / "bad.tsv", ["id\tcategory\ttext", "1\tsports\tx"])
    with pytest.raises(TaskError, match="no column index_id"):
        load_sib200(tmp_path / "bad.tsv", "uig")


def test_plain_jsonl_generation(tmp_path: Path) -> None:
    train = write_lines(tmp_path / "train.jsonl", [json.dumps({"input": "Uyghur: سالام\nEnglish:", "gold": "Hello"})])
    path = write_lines(
        tmp_path / "task.jsonl",
        [
            json.dumps({"input": "Uyghur: رەھمەت\nEnglish:", "gold": "Thank you"}, ensure_ascii=False),
            json.dumps({"id": "x", "input": "Uyghur: ھەئە\nEnglish:", "gold": "Yes"}, ensure_ascii=False),
            json.dumps({"input": "Q", "gold": "A", "options": ["a", "b"]}),
            json.dumps({"input": "Uyghur: ياق\nEnglish:"}, ensure_ascii=False),
        ],
    )
    data = load_jsonl(path, train_path=train, instruction="Translate Uyghur into English.")
    assert data.task == "jsonl:task"
    assert [i.id for i in data.items] == ["task:1", "x"]
    item = data.items[0]
    assert item.prompt == (
        "Translate Uyghur into English.\nUyghur: سالام\nEnglish: Hello\n\n"
        "Translate Uyghur into English.\nUyghur: رەھمەت\nEnglish:"
    )
    assert (item.gold, item.kind, item.metric) == ("Thank you", "generate", "chrf++")
    assert [(w.line, w.field) for w in data.warnings] == [(4, "gold"), (3, "options")]


def test_plain_jsonl_choice(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "mc.jsonl",
        [
            json.dumps({"input": "ཆུ་ཚ་པོ་ཡིན་ནམ།", "options": ["ཡིན།", "མིན།"], "gold": "མིན།"}, ensure_ascii=False),
            json.dumps({"input": "Q2", "options": ["x", "y", "z"], "gold": "C"}),
            json.dumps({"input": "Q3", "options": ["x", "y"], "gold": "maybe"}),
        ],
    )
    data = load_task("jsonl", path, settings=PromptSettings(shots=0))
    assert [(i.gold, i.kind, i.metric) for i in data.items] == [
        ("B", "choice", "accuracy"),
        ("C", "choice", "accuracy"),
    ]
    assert data.items[0].prompt == "ཆུ་ཚ་པོ་ཡིན་ནམ།\nOptions:\nA. ཡིན།\nB. མིན།\nAnswer:"
    [w] = data.warnings
    assert (w.line, w.field) == (3, "gold")
    assert score_outputs(data.items, [" B", "A"]) == 50.0


def test_language_names_and_dispatch() -> None:
    assert language_name("bo") == "Tibetan"
    assert language_name("uig_Arab") == "Uyghur"
    assert language_name("Odia") == "Odia"
    with pytest.raises(TaskError, match="unknown task format"):
        load_task("csv", "x")
    with pytest.raises(TaskError, match="shots"):
        PromptSettings(shots=-1)


def test_jsonl_lines_split_on_newline_only(tmp_path: Path) -> None:
    # JSON allows U+2028 (line separator) and U+0085 unescaped inside a string; they do not end a line.
    text = "ئۇيغۇر\u2028تىلى\u0085"
    path = write_lines(tmp_path / "t.jsonl", [json.dumps({"input": text, "gold": "x"}, ensure_ascii=False)] * 2)
    data = load_jsonl(path, settings=PromptSettings(shots=0))
    assert [i.id for i in data.items] == ["t:1", "t:2"] and data.items[0].prompt == text
    assert data.warnings == ()


# --- MiLiC-Eval as distributed, task specs, passages cut to fit, label order ---------------------


def test_distributed_folder_names_and_translation_directions(tmp_path: Path) -> None:
    write_milic(tmp_path, "translation_dialogue", "ug", "train_1", UG_TRAIN)
    write_milic(tmp_path, "translation_dialogue", "ug", "test", UG_TEST)
    title = {"id": "a", "content": "ئۇيغۇر تىلى", "title": "تىل"}
    write_milic(tmp_path, "title_generation_200", "ug", "train_1", [title])
    write_milic(tmp_path, "title_generation_200", "ug", "test", [dict(title, id="b")])
    assert milic_kind("translation_dialogue") == "translation"
    assert milic_kind("title_generation_200") == "title_generation"
    assert milic_kind("text_classification") == "text_classification"

    into_en = load_spec(f"milic:{tmp_path}:translation_dialogue:ug")
    assert into_en.task == "translation_dialogue:ug-en"
    assert into_en.items[0].prompt.endswith("Uyghur: خەير خوش\nEnglish: ") and into_en.items[0].gold == "Goodbye"
    assert load_spec(f"milic:{tmp_path}:translation_dialogue:ug:ug-en").items == into_en.items
    into_ug = load_spec(f"milic:{tmp_path}:translation_dialogue:ug:en-ug")
    assert into_ug.task == "translation_dialogue:en-ug"
    assert into_ug.items[0].prompt.endswith("English: Goodbye\nUyghur: ") and into_ug.items[0].gold == "خەير خوش"
    assert into_ug.files == (
        str(tmp_path / "translation_dialogue" / "ug" / "test.json"),
        str(tmp_path / "translation_dialogue" / "ug" / "train_1.json"),
    )
    titles = load_spec(f"milic:{tmp_path}:title_generation_200:ug")
    assert titles.task == "title_generation_200:ug" and titles.items[0].metric == "rouge-l"


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("milic:ROOT:poetry:ug", "unknown MiLiC-Eval task 'poetry'"),
        ("milic:ROOT:title_generation_200:ug:en-ug", "translation direction is for translation tasks only"),
        ("milic:ROOT:translation_dialogue:en-ug", "give the language folder, then the direction"),
        ("milic:ROOT:translation_dialogue:ug:ug-ug", "into itself"),
        ("milic:ROOT:ug", "milic:ROOT:TASK:LANG[:SRC-TGT]"),
        ("sib200:only", "sib200:FILE:LANG"),
        ("tasks.csv", "unknown task"),
    ],
)
def test_bad_task_specs_are_one_line(tmp_path: Path, spec: str, needle: str) -> None:
    write_milic(tmp_path, "translation_dialogue", "ug", "test", UG_TEST)
    write_milic(tmp_path, "title_generation_200", "ug", "test", [{"id": "a", "content": "x", "title": "y"}])
    with pytest.raises(TaskError, match=None) as info:
        load_spec(spec.replace("ROOT", str(tmp_path)), settings=PromptSettings(shots=0))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_passage_is_cut_to_fit_when_no_examples_are_left(tmp_path: Path) -> None:
    # A passage of 300 characters cannot fit a budget of 250 even alone: it is cut (never the run).
    long_text = "ئۇيغۇر تىلى " * 25
    train = [
        {"id": "e", "text": "قىسقا", "label": {"en": "sports"}},
        {"id": "f", "text": "ت", "label": {"en": "health"}},
    ]
    test = [
        {"id": "long", "text": long_text, "label": {"en": "health"}},
        {"id": "short", "text": "قىسقا تېكىست", "label": {"en": "sports"}},
    ]
    path = write_milic(tmp_path, "text_classification", "ug", "test", test)
    write_milic(tmp_path, "text_classification", "ug", "train_1", train)
    settings = PromptSettings(shots=1, max_prompt=250)
    data = load_milic(tmp_path, "text_classification", "ug", settings=settings)
    cut, short = data.items
    assert len(cut.prompt) <= 250 and cut.n_shots == 0
    assert cut.cut_to is not None and 0 < cut.cut_to < len(long_text)
    assert f"Text: {long_text[: cut.cut_to]}\nCandidate labels" in cut.prompt
    # the most that fits: one more character would not
    assert len(cut.prompt) + 1 > 250 or cut.cut_to == len(long_text) - 1
    assert short.cut_to is None and short.n_shots == 1
    [w] = data.warnings
    assert w.path == str(path) and w.field == "text" and "1 of 2 passages" in w.message
    assert f"cut to {cut.cut_to}-{cut.cut_to} characters" in w.message

    # The same with a token counter (here: words), as trimix eval counts with the model's tokenizer.
    words = PromptSettings(shots=0, max_prompt=30, count_tokens=lambda t: len(t.split()))
    item = load_milic(tmp_path, "text_classification", "ug", settings=words).items[0]
    assert item.cut_to is not None and len(item.prompt.split()) <= 30

    # Reading passages are never cut: the item stays whole and is reported.
    rc = {"id": "c", "context": [long_text], "question": "?", "options": ["a", "b"], "answer": "A"}
    write_milic(tmp_path, "reading_comprehension", "ug", "test", [rc])
    data = load_milic(tmp_path, "reading_comprehension", "ug", settings=PromptSettings(shots=0, max_prompt=200))
    assert data.items[0].cut_to is None and long_text in data.items[0].prompt
    [w] = data.warnings
    assert "over the budget of 200" in w.message


@pytest.mark.slow
def test_candidate_labels_are_sorted_and_the_same_in_every_process(tmp_path: Path) -> None:
    labels = ["travel", "health", "sports", "livelihood", "science/technology", "entertainment", "politics"]
    train = [{"id": str(i), "text": f"t{i}", "label": {"en": label}} for i, label in enumerate(labels)]
    write_milic(tmp_path, "text_classification", "ug", "train_1", train)
    write_milic(tmp_path, "text_classification", "ug", "test", train[:1])
    item = load_milic(tmp_path, "text_classification", "ug", settings=PromptSettings(shots=0)).items[0]
    assert item.options == tuple(sorted(labels))
    script = (
        "import sys; from trimix_cpp.evaluation.readers import load_milic; "
        "print(load_milic(sys.argv[1], 'text_classification', 'ug').items[0].prompt)"
    )
    prompts = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        r = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, env=env, check=True)
        prompts.add(r.stdout)
    assert len(prompts) == 1


def test_limit_below_one_is_refused() -> None:
    data = TaskData("t", tuple(range(5)), (), ())  # type: ignore[arg-type]
    assert data.head(None) == (0, 1, 2, 3, 4) and data.head(2) == (0, 1) and data.head(9) == (0, 1, 2, 3, 4)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(TaskError, match=r"^limit must be a whole number of items, 1 or more"):
            data.head(bad)  # type: ignore[arg-type]
    check_limit(None)


# --- the real benchmark files (skipped where they are not) ---------------------------------------

SHARED = Path(os.environ.get("TRIMIX_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
MILIC = SHARED / "milic-eval"
needs_data = pytest.mark.skipif(not MILIC.is_dir(), reason=f"no MiLiC-Eval files in {MILIC}")

REAL_TASKS = {
    # spec -> (name, records in test.json, kind, metric)
    "math:ug": ("math:ug", 200, "math", "accuracy"),
    "reading_comprehension:ug": ("reading_comprehension:ug", 200, "choice", "accuracy"),
    "response_selection:ug": ("response_selection:ug", 407, "choice", "accuracy"),
    "text_classification:ug": ("text_classification:ug", 504, "generate", "accuracy"),
    "title_generation_200:ug": ("title_generation_200:ug", 200, "generate", "rouge-l"),
    "translation_dialogue:ug": ("translation_dialogue:ug-en", 673, "generate", "chrf++"),
    "translation_dialogue:ug:en-ug": ("translation_dialogue:en-ug", 673, "generate", "chrf++"),
}


@needs_data
@pytest.mark.parametrize("spec", list(REAL_TASKS))
def test_every_shared_milic_task_loads(spec: str) -> None:
    name, n, kind, metric = REAL_TASKS[spec]
    settings = PromptSettings(shots=3, max_prompt=4000)
    data = load_spec(f"milic:{MILIC}:{spec}", settings=settings)
    assert data.task == name and len(data.items) == n
    assert {(i.kind, i.metric) for i in data.items} == {(kind, metric)}
    assert all(len(i.prompt) <= 4000 for i in data.items)
    assert [w for w in data.warnings if w.field != "text" and w.field != "content"] == []
    if kind == "choice":
        assert {len(i.options or ()) for i in data.items} <= {3, 4}
    if name.startswith("text_classification"):
        assert data.items[0].options == ("health", "livelihood", "sports", "travel")


@needs_data
def test_shared_classification_fits_a_small_context_by_cutting() -> None:
    data = load_spec(f"milic:{MILIC}:text_classification:ug", settings=PromptSettings(shots=3, max_prompt=600))
    cut = [i for i in data.items if i.cut_to is not None]
    assert cut and all(len(i.prompt) <= 600 for i in data.items)
    [w] = [w for w in data.warnings if w.field == "text"]
    assert f"{len(cut)} of 504 passages" in w.message


@needs_data
def test_shared_sib200_loads() -> None:
    folder = SHARED / "sib-200" / "uig_Arab"
    data = load_spec(f"sib200:{folder / 'test.tsv'}:uig_Arab", train=folder / "train.tsv")
    assert data.task == "sib200:uig_Arab" and len(data.items) == 204 and data.warnings == ()
    labels = tuple(sorted((folder / "labels.txt").read_text(encoding="utf-8").split()))
    assert data.items[0].options == labels


def test_fitted_items_fit_only_what_is_read_and_as_an_eager_load_does(tmp_path: Path) -> None:
    long_text = "ئۇيغۇر تىلى " * 25
    train = [{"id": "e", "text": "قىسقا", "label": {"en": "sports"}}]
    test = [{"id": str(i), "text": long_text if i % 2 else "قىسقا", "label": {"en": "sports"}} for i in range(6)]
    write_milic(tmp_path, "text_classification", "ug", "train_1", train)
    write_milic(tmp_path, "text_classification", "ug", "test", test)
    calls: list[str] = []

    def count(text: str) -> int:
        calls.append(text)
        return len(text)

    budget = PromptSettings(shots=1, max_prompt=250, count_tokens=count)
    data = load_milic(tmp_path, "text_classification", "ug", settings=PromptSettings(shots=1))
    assert not calls and len(data.items[1].prompt) > 250  # read without a budget: nothing counted
    fitted = data.fitted(budget)
    first = fitted[:2]
    assert len(fitted) == 6 and len(first) == 2
    assert all(c.count("Text: ") <= 2 for c in calls) and calls  # only items 0 and 1 were counted
    counted = len(calls)
    assert fitted[1] is first[1] and len(calls) == counted  # fitted once, then remembered
    eager = load_milic(tmp_path, "text_classification", "ug", settings=PromptSettings(shots=1, max_prompt=250))
    assert list(fitted) == list(eager.items)
    assert fitted[-1] == eager.items[-1]
    with pytest.raises(IndexError):
        fitted[6]
    assert fitted.warnings == []  # every item fits, the long ones by cutting
