"""The converter's tokenizer half: a checkpoint's tokenizer files become GGUF metadata that real llama.cpp
tokenizes with exactly as the reference tokenizer (the ``tokenizers`` / ``sentencepiece`` packages) does.

Every tokenizer is built here, offline, in seconds: byte-level BPEs trained with ``tokenizers`` behind the
pre-tokenizers of Qwen2 and Llama 3, SentencePiece BPE models trained with byte fallback in the layouts of
Llama 2 and Gemma 3, and a real-size vocabulary: SmolLM2's 49,152 tokens and 48,900 merges rebuilt as a
``tokenizer.json`` from its packaged GGUF. Each is converted with :func:`write_tokenizer` into a GGUF that
llama.cpp loads vocabulary-only, and its token ids are compared with the reference's on a multilingual set.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import gguf
import pytest

from trimix_cpp._llama import LlamaModel
from trimix_cpp.convert.tokenizer import TokenizerError, load_vocabulary, write_tokenizer

tokenizers = pytest.importorskip("tokenizers")
spm = pytest.importorskip("sentencepiece")

# The languages of the paper, then the cases tokenizers get wrong: code, whitespace runs, digit runs, emoji
# sequences with joiners, and text that spells special tokens.
TEXTS = {
    "tibetan": "བོད་ཡིག་ནི་བོད་མིའི་སྐད་ཡིག་ཡིན། ང་ཚོས་སློབ་གྲྭར་འགྲོ་གི་ཡོད། ཤེས་རབ་ཀྱི་ཕ་རོལ་ཏུ་ཕྱིན་པ།",
    "uyghur": "ئۇيغۇر تىلى ئەرەب يېزىقىدا يېزىلىدۇ. مەن بۈگۈن مەكتەپكە باردىم، ھاۋا ناھايىتى ياخشى.",
    "kazakh": "Қазақ тілі — түркі тілдерінің бірі. Мен бүгін мектепке бардым, ауа райы өте жақсы.",
    "mongolian": "ᠮᠣᠩᠭᠣᠯ ᠪᠢᠴᠢᠭ ᠦᠨ ᠦᠰᠦᠭ᠃ ᠪᠢ ᠡᠳᠦᠷ ᠰᠤᠷᠭᠠᠭᠤᠯᠢ ᠳᠤ ᠶᠠᠪᠤᠭᠰᠠᠨ᠂ ᠠᠭᠠᠷ ᠠ᠋ᠮᠢᠰᠬᠤᠯ ᠮᠠᠰᠢ ᠰᠠᠶᠢᠬᠠᠨ᠃",
    "chinese": "我想在苹果公司工作。今天天气很好，我们去公园散步吧！",
    "english": "The quick brown fox jumps over the lazy dog. I've been 'told he's there, 'RE you sure? We'Ve a'lL",
    "code": 'def f(x: int) -> int:\n    """Square."""\n\treturn x ** 2  # {x!r} != [1, 2]\n\nprint(f(3)); a->b && c||d',
    "whitespace": "a  b   c    d\n\n\n  \t\t  end   \n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n",
    "digits": "3 33 333 3333 33333 333333 3333333 3.3 3..3 3...3 1,000,000 2024-11-29 0x1F",
    "emoji": "🚀 (normal) 😶\u200d🌫️ (joined) ✅ 🦙🦙 👩\u200d👩\u200d👧 🇨🇳 ～ ------======= ......!!!!!!??????",
}

QWEN2_PRE = {
    "type": "Sequence",
    "pretokenizers": [
        {
            "type": "Split",
            "pattern": {
                "Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+"
            },
            "behavior": "Isolated",
            "invert": False,
        },
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
    ],
}
LLAMA3_PRE = {
    "type": "Sequence",
    "pretokenizers": [
        {
            "type": "Split",
            "pattern": {
                "Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+"
            },
            "behavior": "Isolated",
            "invert": False,
        },
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ],
}
SMOLLM_PRE = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}


def corpus() -> list[str]:
    """Training text: the test set itself, repeated with variations, so every script gets merges."""
    lines = []
    for text in TEXTS.values():
        lines.extend([text, text.lower(), text.upper(), " ".join(reversed(text.split()))])
    return lines * 3


# -- building checkpoints -------------------------------------------------------------------------


def tokenizer_json(pre: dict | None, *, normalizer: dict | None = None, ignore_merges: bool = False) -> dict:
    """An empty byte-level BPE tokenizer.json with the given pre-tokenizer, to train or fill."""
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": normalizer,
        "pre_tokenizer": pre,
        "post_processor": BYTE_LEVEL,
        "decoder": BYTE_LEVEL,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": ignore_merges,
            "vocab": {},
            "merges": [],
        },
    }


def train_byte_level_bpe(
    folder: Path, spec: dict, *, specials: list[str], user: list[str], vocab_size: int = 1500
) -> tokenizers.Tokenizer:
    """A byte-level BPE trained with ``tokenizers`` on :func:`corpus`, saved as ``folder/tokenizer.json``."""
    tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.add_tokens([tokenizers.AddedToken(u, special=False, normalized=False) for u in user])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    # Training builds a fresh model: restore the model options the spec asked for (Llama 3's ignore_merges).
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["ignore_merges"] = spec["model"]["ignore_merges"]
    write_json(folder / "tokenizer.json", data)
    return tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def write_gguf(path: Path, checkpoint: Path, arch: str, n_vocab: int | None = None) -> Path:
    """A GGUF holding the family's hyper-parameters and the converted tokenizer: what llama.cpp reads when it
    loads a model's vocabulary only."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(256)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-6)
    write_tokenizer(w, checkpoint, arch, n_vocab=n_vocab)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_ids(path: Path, texts: dict[str, str], *, special: bool) -> dict[str, list[int]]:
    with LlamaModel(path, vocab_only=True) as model:
        return {k: model.tokenize(t, add_bos=False, special=special).tolist() for k, t in texts.items()}


def assert_same(got: dict[str, list[int]], want: dict[str, list[int]]) -> None:
    """Equal ids per text; on failure, the first text that differs and where."""
    for key in want:
        if got[key] != want[key]:
            n = next(
                (i for i, (a, b) in enumerate(zip(got[key], want[key])) if a != b), min(map(len, (got[key], want[key])))
            )
            pytest.fail(
                f"{key}: llama.cpp differs from the reference at token {n}: "
                f"{got[key][n : n + 8]} != {want[key][n : n + 8]}"
            )


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_fields(path: Path) -> dict:
    """The ``tokenizer.*`` metadata of a GGUF file as Python values, read straight from the header (gguf's
    reader takes tens of seconds on a 262,144-token vocabulary here)."""
    data = path.read_bytes()
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        (value,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        pos += n
        return data[pos - n : pos].decode("utf-8")

    def value(kind: int) -> Any:
        if kind == 8:
            return string()
        if kind == 9:
            item, count = take("<I"), take("<Q")
            return [value(item) for _ in range(count)]
        return take(_SCALAR[kind])

    assert data[:4] == b"GGUF"
    pos = 8
    take("<Q")
    n_kv = take("<Q")
    out = {}
    for _ in range(n_kv):
        key = string()
        out[key] = value(take("<I"))
    return {k: v for k, v in out.items() if k.startswith("tokenizer.")}


def not_bytewise(ids: dict[str, list[int]], texts: dict[str, str]) -> None:
    """The vocabulary really merges: far fewer tokens than UTF-8 bytes (a test that passes on a vocabulary
    of bytes alone would prove little)."""
    n_tokens = sum(map(len, ids.values()))
    n_bytes = sum(len(t.encode()) for t in texts.values())
    assert n_tokens < 0.5 * n_bytes, (n_tokens, n_bytes)


# -- byte-level BPE -----------------------------------------------------------------------------

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


@pytest.fixture(scope="module")
def qwen2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tokenizers.Tokenizer]:
    """Qwen2.5's tokenizer layout: its pre-tokenizer and NFC normalizer, <|endoftext|> as BOS-less padding,
    <|im_end|> as EOS, a non-special added token, and more embedding rows than tokens."""
    folder = tmp_path_factory.mktemp("qwen2")
    spec = tokenizer_json(QWEN2_PRE, normalizer={"type": "NFC"})
    tok = train_byte_level_bpe(folder, spec, specials=QWEN_SPECIALS, user=["<tool_call>"])
    ids = {s: tok.token_to_id(s) for s in QWEN_SPECIALS}
    write_json(
        folder / "tokenizer_config.json",
        {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE},
    )
    write_json(folder / "config.json", {"vocab_size": tok.get_vocab_size() + 37, "eos_token_id": ids["<|im_end|>"]})
    write_json(
        folder / "generation_config.json",
        {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]},
    )
    return folder, tok


def special_text(open_: str, close: str, extra: str = "") -> str:
    return f"{open_}user\nབོད་ཡིག ئۇيغۇر{close}\n{open_}assistant\n{extra}Қазақ 123{close}"


def test_qwen2_bpe_tokenizes_like_the_reference(
    qwen2_checkpoint: tuple[Path, tokenizers.Tokenizer], tmp_path: Path
) -> None:
    folder, tok = qwen2_checkpoint
    n_vocab = tok.get_vocab_size() + 37
    path = write_gguf(tmp_path / "qwen2.gguf", folder, "qwen2", n_vocab=n_vocab)
    texts = {**TEXTS, "special": special_text("<|im_start|>", "<|im_end|>", "<tool_call>{}")}
    want = {k: tok.encode(t, add_special_tokens=False).ids for k, t in texts.items()}
    got = llama_ids(path, texts, special=True)
    assert_same(got, want)
    not_bytewise(got, texts)

    fields = gguf_fields(path)
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "qwen2"
    assert len(fields["tokenizer.ggml.tokens"]) == n_vocab
    assert fields["tokenizer.ggml.merges"] == [
        " ".join(m) if isinstance(m, list) else m
        for m in json.loads((folder / "tokenizer.json").read_text())["model"]["merges"]
    ]
    types = fields["tokenizer.ggml.token_type"]
    assert [types[tok.token_to_id(s)] for s in QWEN_SPECIALS] == [gguf.TokenType.CONTROL] * 3
    assert types[tok.token_to_id("<tool_call>")] == gguf.TokenType.USER_DEFINED
    assert types[-37:] == [gguf.TokenType.UNUSED] * 37
    assert fields["tokenizer.ggml.tokens"][-1] == f"[PAD{n_vocab - 1}]"
    assert fields["tokenizer.ggml.eos_token_id"] == tok.token_to_id("<|im_end|>")
    assert fields["tokenizer.ggml.padding_token_id"] == tok.token_to_id("<|endoftext|>")
    assert fields["tokenizer.ggml.bos_token_id"] == tok.token_to_id("<|endoftext|>")  # from generation_config.json
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE
    with LlamaModel(path, vocab_only=True) as model:
        assert model.n_vocab == n_vocab
        assert model.add_bos is False
        attrs = model.token_attrs()
        assert (attrs[-37:] == 2).all()  # llama.cpp's LLAMA_TOKEN_ATTR_UNUSED alone
        assert model.is_eog(tok.token_to_id("<|im_end|>"))


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def llama3_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tokenizers.Tokenizer]:
    """Llama 3.x's tokenizer layout: its pre-tokenizer (digits in threes), merges ignored for whole-word
    hits, BOS added by the post-processor."""
    folder = tmp_path_factory.mktemp("llama3")
    spec = tokenizer_json(LLAMA3_PRE, ignore_merges=True)
    spec["post_processor"] = {
        "type": "Sequence",
        "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            {
                "type": "TemplateProcessing",
                "single": [
                    {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}},
                ],
                "pair": [
                    {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}},
                    {"Sequence": {"id": "B", "type_id": 1}},
                ],
                "special_tokens": {
                    "<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [0], "tokens": ["<|begin_of_text|>"]}
                },
            },
        ],
    }
    tok = train_byte_level_bpe(folder, spec, specials=LLAMA3_SPECIALS, user=[])
    write_json(
        folder / "tokenizer_config.json",
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": CHAT_TEMPLATE},
    )
    return folder, tok


def test_llama3_bpe_tokenizes_like_the_reference(
    llama3_checkpoint: tuple[Path, tokenizers.Tokenizer], tmp_path: Path
) -> None:
    """Llama 3.x, including the BOS its post-processor adds, which llama.cpp must add too."""
    folder, tok = llama3_checkpoint
    path = write_gguf(tmp_path / "llama3.gguf", folder, "llama")
    texts = {**TEXTS, "special": special_text("<|start_header_id|>", "<|eot_id|>")}
    want = {k: tok.encode(t, add_special_tokens=False).ids for k, t in texts.items()}
    got = llama_ids(path, texts, special=True)
    assert_same(got, want)
    not_bytewise(got, texts)
    fields = gguf_fields(path)
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("gpt2", "llama-bpe")
    assert fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["tokenizer.ggml.bos_token_id"] == 0
    assert fields["tokenizer.ggml.eos_token_id"] == tok.token_to_id("<|eot_id|>")
    with LlamaModel(path, vocab_only=True) as model:
        with_bos = model.tokenize(TEXTS["kazakh"], add_bos=model.add_bos, special=True).tolist()
    assert with_bos == tok.encode(TEXTS["kazakh"], add_special_tokens=True).ids
    assert with_bos[0] == 0


def test_the_pre_tokenizer_name_matters(llama3_checkpoint: tuple[Path, tokenizers.Tokenizer], tmp_path: Path) -> None:
    """The comparison can fail: the same vocabulary under Qwen2's pre-tokenizer name (digits one by one
    instead of in threes) tokenizes the digit text differently from the reference."""
    folder, tok = llama3_checkpoint
    vocab = load_vocabulary(folder, "llama")
    assert vocab.pre == "llama-bpe"
    w = gguf.GGUFWriter(str(tmp_path / "wrong.gguf"), "qwen2")
    for key, value in (("context_length", 256), ("embedding_length", 8), ("block_count", 1)):
        getattr(w, f"add_{key}")(value)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got = llama_ids(tmp_path / "wrong.gguf", {"digits": TEXTS["digits"]}, special=False)
    assert got["digits"] != tok.encode(TEXTS["digits"], add_special_tokens=False).ids


def smollm2_tokenizer_json(folder: Path) -> Path:
    """SmolLM2's tokenizer rebuilt as the tokenizer.json its checkpoint ships, from the packaged GGUF: the
    49,152 tokens and 48,900 merges, its 17 control tokens as added tokens, its pre-tokenizer (single
    digits, then GPT-2's byte-level regex)."""
    from trimix_cpp.packaged import smollm2_path

    fields = gguf_fields(smollm2_path())
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    spec = tokenizer_json(SMOLLM_PRE)
    spec["model"]["vocab"] = {t: i for i, t in enumerate(tokens)}
    spec["model"]["merges"] = fields["tokenizer.ggml.merges"]
    spec["added_tokens"] = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, (t, k) in enumerate(zip(tokens, types))
        if k == gguf.TokenType.CONTROL
    ]
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "tokenizer.json", spec)
    write_json(
        folder / "tokenizer_config.json",
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "add_bos_token": False},
    )
    write_json(folder / "config.json", {"vocab_size": len(tokens), "bos_token_id": 1, "eos_token_id": 2})
    return folder


@pytest.mark.slow
def test_smollm2_real_vocabulary_round_trips(tmp_path: Path) -> None:
    """A real 49,152-token vocabulary: tokenizer.json -> GGUF gives back the packaged GGUF's tokens, types,
    merges and special ids, and llama.cpp tokenizes like ``tokenizers`` and like the original file."""
    from trimix_cpp.packaged import smollm2_path

    folder = smollm2_tokenizer_json(tmp_path / "smollm2")
    path = write_gguf(tmp_path / "smollm2.gguf", folder, "llama", n_vocab=49152)
    got_fields, orig = gguf_fields(path), gguf_fields(smollm2_path())
    for key in ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "padding_token_id"):
        assert got_fields[f"tokenizer.ggml.{key}"] == orig[f"tokenizer.ggml.{key}"], key
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    texts = {**TEXTS, "special": special_text("<|im_start|>", "<|im_end|>")}
    want = {k: tok.encode(t, add_special_tokens=False).ids for k, t in texts.items()}
    got = llama_ids(path, texts, special=True)
    assert_same(got, want)
    assert_same(llama_ids(smollm2_path(), texts, special=True), want)
    not_bytewise({k: v for k, v in got.items() if k in ("english", "code")}, {k: TEXTS[k] for k in ("english", "code")})


# -- SentencePiece ------------------------------------------------------------------------------


def train_sentencepiece(
    folder: Path,
    *,
    add_dummy_prefix: bool,
    ids: dict[str, int],
    user: tuple[str, ...] = (),
    control: tuple[str, ...] = (),
) -> spm.SentencePieceProcessor:
    """A SentencePiece BPE model with byte fallback, trained in about a second, as Llama 2 and Gemma ship it:
    identity normalization, whitespace kept as it is, digits split."""
    model = io.BytesIO()
    pieces = (
        {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
        if ids["bos"] == 1
        else {"unk": "<unk>", "bos": "<bos>", "eos": "<eos>", "pad": "<pad>"}
    )
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=1200,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=0.995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=add_dummy_prefix,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=list(user),
        control_symbols=list(control),
        unk_id=ids["unk"],
        bos_id=ids["bos"],
        eos_id=ids["eos"],
        pad_id=ids.get("pad", -1),
        unk_piece=pieces["unk"],
        bos_piece=pieces["bos"],
        eos_piece=pieces["eos"],
        pad_piece=pieces["pad"],
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))


def sentencepiece_json(sp: spm.SentencePieceProcessor, *, prefix: bool, user: tuple[str, ...] = ()) -> dict:
    """The tokenizer.json a SentencePiece BPE model is published with (Llama 2, Gemma): the same pieces, merges
    made from every split of every piece into two pieces, ordered by the joined piece's score, byte fallback."""

    def kind(i: int) -> int:
        if sp.is_unknown(i):
            return 2
        if sp.is_control(i):
            return 3
        if sp.is_byte(i):
            return 6
        return 4 if sp.id_to_piece(i) in user else 1

    pieces = [(sp.id_to_piece(i), sp.get_score(i), kind(i)) for i in range(sp.get_piece_size())]
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    normal = {p for p, _, k in pieces if k == 1}
    merges = []
    for p, score, k in pieces:
        if k != 1:
            continue
        for cut in range(1, len(p)):
            left, right = p[:cut], p[cut:]
            if left in normal and right in normal:
                merges.append((-score, vocab[left], vocab[right], left, right))
    merges.sort()
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    normalizer = (
        {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, replace]} if prefix else replace
    )
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": p,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": k != 4,
            }
            for i, (p, _, k) in enumerate(pieces)
            if k in (2, 3, 4)
        ],
        "normalizer": normalizer,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": sp.id_to_piece(sp.unk_id()),
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [[m[3], m[4]] for m in merges],
        },
    }


LLAMA2_IDS = {"unk": 0, "bos": 1, "eos": 2}
GEMMA3_IDS = {"pad": 0, "eos": 1, "bos": 2, "unk": 3}


@pytest.fixture(scope="module")
def llama2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, spm.SentencePieceProcessor]:
    folder = tmp_path_factory.mktemp("llama2")
    sp = train_sentencepiece(folder, add_dummy_prefix=True, ids=LLAMA2_IDS)
    write_json(
        folder / "tokenizer_config.json",
        {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    )
    write_json(
        folder / "config.json",
        {"vocab_size": sp.get_piece_size(), "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": -1},
    )
    return folder, sp


def test_llama2_sentencepiece_tokenizes_like_the_reference(
    llama2_checkpoint: tuple[Path, spm.SentencePieceProcessor], tmp_path: Path
) -> None:
    """Llama 2: tokenizer.model read by the converter's own protobuf reader; a leading space added; control
    tokens spelled in text stay text in both tokenizers."""
    folder, sp = llama2_checkpoint
    path = write_gguf(tmp_path / "llama2.gguf", folder, "llama")
    texts = {**TEXTS, "special": "<s>[INST] བོད་ཡིག ئۇيغۇر [/INST] Қазақ 123 </s>"}
    want = {k: sp.encode(t) for k, t in texts.items()}
    got = llama_ids(path, texts, special=False)
    assert_same(got, want)
    not_bytewise(got, texts)
    fields = gguf_fields(path)
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("llama", "default")
    assert fields["tokenizer.ggml.add_space_prefix"] is True
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert fields["tokenizer.ggml.unknown_token_id"] == 0
    assert "tokenizer.ggml.padding_token_id" not in fields  # config.json's -1 means none
    assert fields["tokenizer.ggml.add_bos_token"] is True
    types = fields["tokenizer.ggml.token_type"]
    assert types.count(gguf.TokenType.BYTE) == 256
    assert [sp.get_score(i) for i in range(sp.get_piece_size())] == pytest.approx(fields["tokenizer.ggml.scores"])
    with LlamaModel(path, vocab_only=True) as model:
        assert model.tokenize(TEXTS["english"], add_bos=model.add_bos).tolist() == [1, *sp.encode(TEXTS["english"])]


def test_sentencepiece_as_tokenizer_json(
    llama2_checkpoint: tuple[Path, spm.SentencePieceProcessor], tmp_path: Path
) -> None:
    """A checkpoint that ships the SentencePiece model only as tokenizer.json: piece scores are rebuilt from the
    merge order, and llama.cpp still tokenizes as SentencePiece and as ``tokenizers`` do."""
    _, sp = llama2_checkpoint
    folder = tmp_path / "llama2-json"
    folder.mkdir()
    write_json(folder / "tokenizer.json", sentencepiece_json(sp, prefix=True))
    write_json(folder / "tokenizer_config.json", {"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>"})
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    texts = dict(TEXTS)
    want = {k: sp.encode(t) for k, t in texts.items()}
    assert_same({k: tok.encode(t, add_special_tokens=False).ids for k, t in texts.items()}, want)
    path = write_gguf(tmp_path / "llama2-json.gguf", folder, "llama")
    assert_same(llama_ids(path, texts, special=False), want)
    fields = gguf_fields(path)
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.token_type"].count(gguf.TokenType.BYTE) == 256
    assert fields["tokenizer.ggml.bos_token_id"] == 1


def test_gemma3_sentencepiece_tokenizes_like_the_reference(tmp_path: Path) -> None:
    """Gemma 3's layout: <pad> <eos> <bos> <unk> first, no leading space, chat-turn markers that are
    user-defined pieces in tokenizer.model and special in tokenizer_config.json (so control tokens in the
    GGUF), more embedding rows than pieces."""
    folder = tmp_path / "gemma3"
    turn = ("<start_of_turn>", "<end_of_turn>")
    sp = train_sentencepiece(folder, add_dummy_prefix=False, ids=GEMMA3_IDS, user=turn, control=("<mask>",))
    write_json(folder / "tokenizer.json", sentencepiece_json(sp, prefix=False, user=turn))
    decoder = {str(sp.piece_to_id(t)): {"content": t, "special": True} for t in turn}
    template = (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}"
    )
    write_json(
        folder / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": "<bos>",
            "eos_token": "<eos>",
            "pad_token": "<pad>",
            "added_tokens_decoder": decoder,
        },
    )
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    write_json(
        folder / "config.json",
        {"vocab_size": sp.get_piece_size() + 64, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0},
    )
    n_vocab = sp.get_piece_size() + 64
    path = write_gguf(tmp_path / "gemma3.gguf", folder, "gemma3", n_vocab=n_vocab)
    texts = {**TEXTS, "special": f"{turn[0]}user\nབོད་ཡིག ئۇيغۇر{turn[1]}\n{turn[0]}model\nҚазақ 123{turn[1]}"}
    want = {k: sp.encode(t) for k, t in texts.items()}
    got = llama_ids(path, texts, special=True)
    assert_same(got, want)
    not_bytewise(got, texts)
    fields = gguf_fields(path)
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("llama", "default")
    assert fields["tokenizer.ggml.add_space_prefix"] is False
    ids = {k: fields[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "padding", "unknown")}
    assert ids == {"bos": 2, "eos": 1, "padding": 0, "unknown": 3}
    types = fields["tokenizer.ggml.token_type"]
    assert [types[sp.piece_to_id(t)] for t in turn] == [gguf.TokenType.CONTROL] * 2
    assert types[sp.piece_to_id("<mask>")] == gguf.TokenType.CONTROL
    assert types[-64:] == [gguf.TokenType.UNUSED] * 64
    assert fields["tokenizer.chat_template"] == template
    with LlamaModel(path, vocab_only=True) as model:
        assert model.n_vocab == n_vocab
        assert model.add_bos and model.bos_id == 2
        assert model.is_eog(sp.piece_to_id("<end_of_turn>"))


# -- bad input: one line each, before anything is written ---------------------------------------


def convert_error(folder: Path, arch: str = "qwen2", n_vocab: int | None = None) -> str:
    w = gguf.GGUFWriter(str(folder / "out.gguf"), arch)
    with pytest.raises(TokenizerError) as info:
        write_tokenizer(w, folder, arch, n_vocab=n_vocab)
    message = str(info.value)
    assert "\n" not in message
    assert not any(k.startswith("tokenizer.") for kv in w.kv_data for k in kv)  # nothing was added
    return message


def copy_bpe(src: Path, dst: Path, edit=None) -> Path:
    dst.mkdir()
    data = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    if edit is not None:
        edit(data)
    write_json(dst / "tokenizer.json", data)
    return dst


def test_missing_tokenizer_files(tmp_path: Path) -> None:
    write_json(tmp_path / "config.json", {"vocab_size": 10})
    assert "no tokenizer for qwen2" in convert_error(tmp_path)
    assert "checkpoint folder not found" in convert_error_missing(tmp_path / "nowhere")


def convert_error_missing(folder: Path) -> str:
    with pytest.raises(TokenizerError) as info:
        load_vocabulary(folder)
    return str(info.value)


def test_corrupt_tokenizer_json(qwen2_checkpoint: tuple[Path, tokenizers.Tokenizer], tmp_path: Path) -> None:
    src, _ = qwen2_checkpoint
    text = (src / "tokenizer.json").read_text(encoding="utf-8")
    (tmp_path / "tokenizer.json").write_text(text[: len(text) // 2], encoding="utf-8")
    assert "is not valid JSON" in convert_error(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes(b"\xff\xfe garbage")
    assert "not UTF-8" in convert_error(tmp_path)


def test_merge_naming_a_missing_token(qwen2_checkpoint: tuple[Path, tokenizers.Tokenizer], tmp_path: Path) -> None:
    def edit(data: dict) -> None:
        data["model"]["merges"][5] = ["Ġzzqq", "xx"]

    folder = copy_bpe(qwen2_checkpoint[0], tmp_path / "bad", edit)
    assert "merge #5" in convert_error(folder)


def test_duplicate_token(qwen2_checkpoint: tuple[Path, tokenizers.Tokenizer], tmp_path: Path) -> None:
    def edit(data: dict) -> None:
        data["added_tokens"].append({"id": len(data["model"]["vocab"]) + 10, "content": "a", "special": False})

    folder = copy_bpe(qwen2_checkpoint[0], tmp_path / "dup", edit)
    assert "appears twice" in convert_error(folder)


def test_vocabulary_larger_than_the_embedding(
    qwen2_checkpoint: tuple[Path, tokenizers.Tokenizer], tmp_path: Path
) -> None:
    folder, tok = qwen2_checkpoint
    message = convert_error(folder, n_vocab=tok.get_vocab_size() - 1)
    assert f"has {tok.get_vocab_size()} token ids" in message and f"only {tok.get_vocab_size() - 1} rows" in message


def test_unknown_pre_tokenizer(qwen2_checkpoint: tuple[Path, tokenizers.Tokenizer], tmp_path: Path) -> None:
    def edit(data: dict) -> None:
        data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\p{N}+|\s+"

    message = convert_error(copy_bpe(qwen2_checkpoint[0], tmp_path / "pre", edit))
    assert "is not one trimix can name for llama.cpp" in message and "qwen2, llama-bpe" in message


def test_llama3_pre_tokenizer_without_ignore_merges(
    qwen2_checkpoint: tuple[Path, tokenizers.Tokenizer], tmp_path: Path
) -> None:
    def edit(data: dict) -> None:
        data["pre_tokenizer"] = LLAMA3_PRE
        data["normalizer"] = None

    message = convert_error(copy_bpe(qwen2_checkpoint[0], tmp_path / "l3", edit))
    assert "'llama-bpe'" in message and "ignore" in message


def test_normalizing_byte_level_tokenizer(qwen2_checkpoint: tuple[Path, tokenizers.Tokenizer], tmp_path: Path) -> None:
    def edit(data: dict) -> None:
        data["normalizer"] = {"type": "Lowercase"}

    assert "normalizes text (Lowercase)" in convert_error(copy_bpe(qwen2_checkpoint[0], tmp_path / "lc", edit))


def test_corrupt_tokenizer_model(llama2_checkpoint: tuple[Path, spm.SentencePieceProcessor], tmp_path: Path) -> None:
    data = (llama2_checkpoint[0] / "tokenizer.model").read_bytes()
    (tmp_path / "tokenizer.model").write_bytes(data[: len(data) // 3])
    assert "is not a SentencePiece model" in convert_error(tmp_path, "llama")
    (tmp_path / "tokenizer.model").write_bytes(b"tiktoken-style text\n" * 10)
    assert "tokenizer.model" in convert_error(tmp_path, "llama")


def test_sentencepiece_unigram_and_no_byte_fallback(tmp_path: Path) -> None:
    for name, options in (
        ("unigram", {"model_type": "unigram", "byte_fallback": True}),
        ("nobytes", {"model_type": "bpe", "byte_fallback": False}),
    ):
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus()),
            model_writer=model,
            vocab_size=800,
            hard_vocab_limit=False,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            minloglevel=2,
            **options,
        )
        folder = tmp_path / name
        folder.mkdir()
        (folder / "tokenizer.model").write_bytes(model.getvalue())
        message = convert_error(folder, "llama")
        assert ("unigram model" in message) if name == "unigram" else ("no byte fallback" in message)


def test_corrupt_tokenizer_config(llama2_checkpoint: tuple[Path, spm.SentencePieceProcessor], tmp_path: Path) -> None:
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes((llama2_checkpoint[0] / "tokenizer.model").read_bytes())
    (folder / "tokenizer_config.json").write_text('{"add_bos_token": tru', encoding="utf-8")
    assert "tokenizer_config.json is not valid JSON" in convert_error(folder, "llama")


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(num: int, value: bytes | int | float) -> bytes:
    if isinstance(value, bytes):
        return _varint(num << 3 | 2) + _varint(len(value)) + value
    if isinstance(value, float):
        return _varint(num << 3 | 5) + struct.pack("<f", value)
    return _varint(num << 3) + _varint(value)


def gemma3_tokenizer_model(folder: Path) -> Path:
    """Gemma 3's tokenizer.model (262,144 pieces, byte fallback, no leading space) rebuilt from the packaged
    Gemma 3 270M GGUF, serialized as SentencePiece's ModelProto so the sentencepiece package loads it."""
    from trimix_cpp.packaged import gemma3_270m_path

    fields = gguf_fields(gemma3_270m_path())
    tokens, scores = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.scores"]
    types = fields["tokenizer.ggml.token_type"]
    types[3] = gguf.TokenType.UNKNOWN  # SentencePiece's own type for <unk> (the GGUF marks it control)
    # The GGUF spells user-defined pieces with plain spaces, as llama.cpp matches them; SentencePiece with ▁.
    tokens = [t.replace(" ", "▁") if k == gguf.TokenType.USER_DEFINED else t for t, k in zip(tokens, types)]
    pieces = b"".join(
        _field(1, _field(1, t.encode()) + _field(2, float(s)) + _field(3, int(k)))
        for t, s, k in zip(tokens, scores, types)
    )
    trainer = b"".join(_field(n, v) for n, v in ((3, 2), (4, len(tokens)), (35, 1), (40, 3), (41, 2), (42, 1), (43, 0)))
    normalizer = _field(1, b"identity") + _field(3, 0) + _field(4, 0) + _field(5, 1)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(pieces + _field(2, trainer) + _field(3, normalizer))
    write_json(folder / "tokenizer_config.json", {"add_bos_token": True, "add_eos_token": False})
    write_json(
        folder / "config.json", {"vocab_size": len(tokens), "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
    )
    return folder


@pytest.mark.slow
def test_gemma3_real_vocabulary(tmp_path: Path) -> None:
    """A real 262,144-piece SentencePiece vocabulary: Gemma 3's, as a tokenizer.model. llama.cpp tokenizes the
    converted file as sentencepiece does and as the original GGUF does, and the vocabulary round-trips."""
    from trimix_cpp.packaged import gemma3_270m_path

    folder = gemma3_tokenizer_model(tmp_path / "gemma3")
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    assert sp.get_piece_size() == 262144
    path = write_gguf(tmp_path / "gemma3.gguf", folder, "gemma3", n_vocab=262144)
    texts = dict(TEXTS)
    want = {k: sp.encode(t) for k, t in texts.items()}
    assert_same(llama_ids(path, texts, special=False), want)
    assert_same(llama_ids(gemma3_270m_path(), texts, special=False), want)
    got_fields, orig = gguf_fields(path), gguf_fields(gemma3_270m_path())
    for key in (
        "model",
        "pre",
        "tokens",
        "scores",
        "bos_token_id",
        "eos_token_id",
        "padding_token_id",
        "add_space_prefix",
    ):
        assert got_fields[f"tokenizer.ggml.{key}"] == orig[f"tokenizer.ggml.{key}"], key


def test_special_tokens_from_special_tokens_map(
    qwen2_checkpoint: tuple[Path, tokenizers.Tokenizer], tmp_path: Path
) -> None:
    """Older checkpoints name their special tokens only in special_tokens_map.json."""
    folder = copy_bpe(qwen2_checkpoint[0], tmp_path / "map")
    tok = qwen2_checkpoint[1]
    write_json(
        folder / "special_tokens_map.json", {"eos_token": {"content": "<|im_end|>"}, "pad_token": "<|endoftext|>"}
    )
    fields = gguf_fields(write_gguf(tmp_path / "map.gguf", folder, "qwen2"))
    assert fields["tokenizer.ggml.eos_token_id"] == tok.token_to_id("<|im_end|>")
    assert fields["tokenizer.ggml.padding_token_id"] == tok.token_to_id("<|endoftext|>")
    assert "tokenizer.ggml.bos_token_id" not in fields


def test_unigram_tokenizer_json(tmp_path: Path) -> None:
    write_json(tmp_path / "tokenizer.json", {"model": {"type": "Unigram", "vocab": [["<unk>", 0.0], ["a", -1.0]]}})
    assert "a Unigram tokenizer is not one trimix converts" in convert_error(tmp_path, "llama")
