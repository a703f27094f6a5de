"""A checkpoint's tokenizer as GGUF metadata (``tokenizer.ggml.*``), read without torch or transformers.

llama.cpp re-implements tokenization itself: it needs the vocabulary, the merge list or the piece scores,
each token's type, and the *name* of the pre-tokenizer, because it carries its own copy of every
pre-tokenizer regex it supports and picks one by name. This module reads the files a Hugging Face
checkpoint ships and produces exactly that, for the two tokenizer kinds of the paper's model families:

* byte-level BPE from ``tokenizer.json`` (Qwen2/2.5, Llama 3.x, SmolLM2): tokenizer model ``gpt2``;
* SentencePiece BPE with byte fallback from ``tokenizer.model`` (Llama 2, Gemma 3), or from a
  SentencePiece-style ``tokenizer.json`` when no ``tokenizer.model`` is shipped: tokenizer model ``llama``.

How the pre-tokenizer name is found: from the pre-tokenizer that ``tokenizer.json`` declares (its split
regex, its digit rule, its byte-level options), matched exactly against the definitions llama.cpp
implements under each name. llama.cpp's own converter instead hashes the token ids a reference tokenizer
gives for a check text; that needs the ``tokenizers`` package at run time and recognises only the exact
vocabularies it has seen, so a checkpoint whose vocabulary was extended or retrained (a continued-pretraining
model with new tokens) would not be recognised although its pre-tokenizer is unchanged. Matching the
declaration identifies what llama.cpp actually reimplements, and anything else is refused with one line
rather than converted into a model that tokenizes differently from the one it was trained with.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from ..errors import TrimixError

__all__ = ["TokenizerError", "Vocabulary", "load_vocabulary", "write_tokenizer"]

T = gguf.TokenType


class TokenizerError(TrimixError):
    """The checkpoint's tokenizer files are missing, unreadable, or of a kind llama.cpp cannot reproduce."""


# -- what llama.cpp implements under each pre-tokenizer name ---------------------------------------

# The split regexes exactly as the model families' tokenizer.json files declare them.
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# name -> (pre-tokenizer signature, whether llama.cpp ignores merges for whole-word vocabulary hits).
# A signature is the tuple _signature() builds from tokenizer.json's pre_tokenizer.
_KNOWN_PRE: dict[str, tuple[tuple[Any, ...], bool]] = {
    "qwen2": ((("split", _QWEN2_REGEX), ("bytelevel", False)), False),
    "llama-bpe": ((("split", _LLAMA3_REGEX), ("bytelevel", False)), True),
    "smollm": ((("digits", True), ("bytelevel", True)), False),
    "gpt-2": ((("bytelevel", True),), False),
}

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPIECE_SPACE = "\u2581"  # ▁, SentencePiece's visible space

# SentencePiece piece types (sentencepiece_model.proto) coincide with GGUF's token types.
_SP_TYPES = {int(t) for t in (T.NORMAL, T.UNKNOWN, T.CONTROL, T.USER_DEFINED, T.UNUSED, T.BYTE)}


@dataclass
class Vocabulary:
    """Everything ``tokenizer.ggml.*`` holds apart from the special-token ids and flags."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece BPE)
    pre: str  # llama.cpp's pre-tokenizer name ("default" for SentencePiece)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    add_space_prefix: bool | None = None
    source: str = ""  # the file the vocabulary was read from, for messages
    special_ids: dict[str, int] = field(default_factory=dict)  # ids the tokenizer file itself names

    def __len__(self) -> int:
        return len(self.tokens)


# -- reading files ------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TokenizerError(f"cannot read {path}: {exc.strerror or exc} (check the file's permissions)") from None
    except UnicodeDecodeError:
        raise TokenizerError(f"{path} is not UTF-8 text (the file is corrupt: download it again)") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise TokenizerError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}; the file is corrupt "
            "or truncated: download it again)"
        ) from None


def _optional_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = _read_json(path)
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} does not hold a JSON object (the file is corrupt: download it again)")
    return data


def _looks_special(text: str) -> bool:
    """Added tokens that are control tokens in practice although some checkpoints do not mark them special
    (the same rule llama.cpp's converter applies, so both conversions type these tokens alike)."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<｜") and text.endswith("｜>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def _added_tokens(tj: dict[str, Any], path: Path) -> list[tuple[int, str, bool]]:
    """(id, content, special) of tokenizer.json's ``added_tokens``."""
    raw = tj.get("added_tokens") or []
    if not isinstance(raw, list):
        raise TokenizerError(f"{path}: 'added_tokens' is not a list (the file is corrupt: download it again)")
    out = []
    for i, entry in enumerate(raw):
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("id"), int)
            or isinstance(entry.get("id"), bool)
            or entry["id"] < 0
            or not isinstance(entry.get("content"), str)
        ):
            raise TokenizerError(f"{path}: added token #{i} has no valid id and content (the file is corrupt)")
        out.append((entry["id"], entry["content"], bool(entry.get("special", False))))
    return out


def _model_vocab(model: dict[str, Any], path: Path) -> dict[str, int]:
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise TokenizerError(
            f"{path}: the model has no vocabulary (the file is corrupt or truncated: download it again)"
        )
    for tok, tid in vocab.items():
        if not isinstance(tid, int) or isinstance(tid, bool) or tid < 0:
            raise TokenizerError(f"{path}: token {tok!r} has the id {tid!r}, not a non-negative integer (corrupt file)")
    return vocab


def _model_merges(model: dict[str, Any], vocab: dict[str, int], path: Path) -> list[str]:
    """The merge list as GGUF stores it: ``"left right"`` strings, in rank order. Every merge must join two
    vocabulary tokens into a third; a merge that does not is a corrupt file, and llama.cpp would act on it."""
    raw = model.get("merges")
    if not isinstance(raw, list):
        raise TokenizerError(f"{path}: the BPE model has no merge list (the file is corrupt: download it again)")
    merges: list[str] = []
    for rank, m in enumerate(raw):
        if isinstance(m, str):
            parts = m.split(" ")
        elif isinstance(m, list) and all(isinstance(p, str) for p in m):
            parts = m
        else:
            parts = []
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise TokenizerError(f"{path}: merge #{rank} ({m!r}) is not a pair of tokens (the file is corrupt)")
        left, right = parts
        if left not in vocab or right not in vocab or left + right not in vocab:
            raise TokenizerError(
                f"{path}: merge #{rank} ({left!r} + {right!r}) names a token missing from the vocabulary "
                "(the file is corrupt or was edited by hand)"
            )
        if " " in left or " " in right:
            # GGUF separates the two sides by a space; a space inside a token is stored as U+0120.
            left, right = (p.replace(" ", "\u0120") for p in (left, right))
        merges.append(f"{left} {right}")
    return merges


def _size(n_tokens_max_id: int, n_vocab: int | None, what: str) -> int:
    """The GGUF vocabulary size: the tokenizer's, or the embedding's rows when given (padding the rest)."""
    if n_vocab is None:
        return n_tokens_max_id
    if isinstance(n_vocab, bool) or not isinstance(n_vocab, int) or n_vocab <= 0:
        raise TokenizerError(f"the vocabulary size must be a positive integer, got {n_vocab!r}")
    if n_tokens_max_id > n_vocab:
        raise TokenizerError(
            f"{what} has {n_tokens_max_id} token ids but the model's embedding has only {n_vocab} rows "
            "(the tokenizer files belong to another model: use the checkpoint's own tokenizer)"
        )
    return n_vocab


def _check_byte_tokens(tokens: list[str], types: list[int], source: str) -> None:
    """llama.cpp's SentencePiece tokenizer falls back to the 256 byte tokens for any character outside the
    vocabulary and aborts the process when one is missing: a vocabulary without them is refused."""
    have = {t for t, k in zip(tokens, types) if k == int(T.BYTE)}
    missing = [b for b in range(256) if f"<0x{b:02X}>" not in have]
    if missing:
        raise TokenizerError(
            f"{source}: the SentencePiece vocabulary has no byte fallback (byte token <0x{missing[0]:02X}> and "
            f"{len(missing) - 1} more are missing), so llama.cpp cannot tokenize text outside it "
            "(convert this model with llama.cpp's convert_hf_to_gguf.py)"
        )


def _check_unique(tokens: list[str], source: str) -> None:
    """llama.cpp aborts the process on a vocabulary that names one token twice; refuse it here."""
    if len(set(tokens)) != len(tokens):
        seen: set[str] = set()
        for i, t in enumerate(tokens):
            if t in seen:
                raise TokenizerError(f"{source}: token {t!r} appears twice (id {i}); the file is corrupt")
            seen.add(t)


# -- byte-level BPE from tokenizer.json ---------------------------------------------------------


def _signature(pre: Any, path: Path) -> tuple[Any, ...]:
    """A comparable description of a pre-tokenizer: its steps, with only the options that change tokens."""
    if pre is None:
        return ()
    if not isinstance(pre, dict):
        raise TokenizerError(f"{path}: 'pre_tokenizer' is not an object (the file is corrupt)")
    kind = pre.get("type")
    if kind == "Sequence":
        steps: list[Any] = []
        for p in pre.get("pretokenizers") or []:
            steps.extend(_signature(p, path))
        return tuple(steps)
    if kind == "ByteLevel":
        if pre.get("add_prefix_space", False):
            return (("bytelevel-prefix-space", bool(pre.get("use_regex", True))),)
        return (("bytelevel", bool(pre.get("use_regex", True))),)
    if kind == "Split":
        pattern = pre.get("pattern") or {}
        regex = pattern.get("Regex") if isinstance(pattern, dict) else None
        if regex is None or pre.get("behavior") != "Isolated" or pre.get("invert", False):
            return (("split-other", json.dumps(pre, sort_keys=True)),)
        return (("split", regex),)
    if kind == "Digits":
        return (("digits", bool(pre.get("individual_digits", False))),)
    return ((str(kind), json.dumps(pre, sort_keys=True)),)


def _describe(sig: tuple[Any, ...]) -> str:
    parts = []
    for step in sig:
        name, arg = step
        if name == "split":
            parts.append(f"split on /{arg[:48]}{'...' if len(arg) > 48 else ''}/")
        elif name.startswith("bytelevel"):
            parts.append(
                "byte-level" + (" with regex" if arg else "") + (" adding a prefix space" if "prefix" in name else "")
            )
        elif name == "digits":
            parts.append("single digits" if arg else "digit runs")
        else:
            parts.append(name)
    return ", then ".join(parts) or "none"


def _bpe_pre_name(tj: dict[str, Any], model: dict[str, Any], path: Path) -> str:
    normalizer = tj.get("normalizer")
    if normalizer is not None and not (isinstance(normalizer, dict) and normalizer.get("type") == "NFC"):
        kind = normalizer.get("type") if isinstance(normalizer, dict) else type(normalizer).__name__
        raise TokenizerError(
            f"{path}: the byte-level tokenizer normalizes text ({kind}), which llama.cpp does not do, so its "
            "tokens would differ (convert this model with llama.cpp's convert_hf_to_gguf.py)"
        )
    sig = _signature(tj.get("pre_tokenizer"), path)
    for name, (known, ignore_merges) in _KNOWN_PRE.items():
        if sig == known:
            if bool(model.get("ignore_merges", False)) != ignore_merges:
                raise TokenizerError(
                    f"{path}: the pre-tokenizer is llama.cpp's {name!r}, but the model "
                    f"{'does not ignore' if ignore_merges else 'ignores'} merges for whole words and llama.cpp's "
                    f"{name!r} {'does' if ignore_merges else 'does not'}, so tokens would differ "
                    "(convert this model with llama.cpp's convert_hf_to_gguf.py)"
                )
            return name
    raise TokenizerError(
        f"{path}: the pre-tokenizer ({_describe(sig)}) is not one trimix can name for llama.cpp "
        f"(known: {', '.join(_KNOWN_PRE)}; for other tokenizers use llama.cpp's convert_hf_to_gguf.py)"
    )


def _is_byte_level(tj: dict[str, Any]) -> bool:
    decoder = tj.get("decoder")
    if isinstance(decoder, dict) and decoder.get("type") == "ByteLevel":
        return True
    pre = tj.get("pre_tokenizer")
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    return any(isinstance(s, dict) and s.get("type") == "ByteLevel" for s in steps)


def _token_table(
    vocab: dict[str, int], added: list[tuple[int, str, bool]], n_vocab: int | None, path: Path
) -> tuple[list[str | None], list[int], int]:
    """Tokens by id (None for a gap) and their types, the model's tokens NORMAL and the added ones CONTROL or
    USER_DEFINED; gaps and padding up to ``n_vocab`` are left for the caller to fill as UNUSED."""
    n = max([*vocab.values(), *(a[0] for a in added)]) + 1
    if n_vocab is None and n > 2 * (len(vocab) + len(added)) + 1024:
        raise TokenizerError(f"{path}: token ids run up to {n - 1} for {len(vocab)} tokens (the file is corrupt)")
    size = _size(n, n_vocab, str(path))
    tokens: list[str | None] = [None] * size
    types = [int(T.UNUSED)] * size
    for tok, tid in vocab.items():
        tokens[tid] = tok
        types[tid] = int(T.NORMAL)
    for tid, content, special in added:
        tokens[tid] = content
        types[tid] = int(T.CONTROL) if special or _looks_special(content) else int(T.USER_DEFINED)
    return tokens, types, size


def _fill_gaps(tokens: list[str | None], types: list[int], scores: list[float] | None, pad_score: float) -> list[str]:
    out: list[str] = []
    for i, t in enumerate(tokens):
        if t is None:
            out.append(f"[PAD{i}]")
            types[i] = int(T.UNUSED)
            if scores is not None:
                scores[i] = pad_score
        else:
            out.append(t)
    return out


def _byte_level_bpe(tj: dict[str, Any], path: Path, n_vocab: int | None) -> Vocabulary:
    model = tj["model"]
    if model.get("byte_fallback", False):
        raise TokenizerError(f"{path}: a byte-level BPE with byte fallback is not a tokenizer llama.cpp knows")
    pre = _bpe_pre_name(tj, model, path)
    vocab = _model_vocab(model, path)
    merges = _model_merges(model, vocab, path)
    tokens, types, _ = _token_table(vocab, _added_tokens(tj, path), n_vocab, path)
    out = _fill_gaps(tokens, types, None, 0.0)
    _check_unique(out, str(path))
    return Vocabulary("gpt2", pre, out, types, merges=merges, source=str(path))


# -- SentencePiece BPE from tokenizer.model (protobuf) ------------------------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, int, Any]]:
    """The (field number, wire type, value) of one protobuf message, values undecoded beyond the wire format."""
    out = []
    pos = 0
    n = len(buf)
    while pos < n:
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"wire type {wire}")
        if pos > n:
            raise ValueError("truncated field")
        out.append((num, wire, value))
    return out


def _int32(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


@dataclass
class _SentencePieceModel:
    pieces: list[str]
    scores: list[float]
    types: list[int]
    model_type: int = 1  # UNIGRAM=1, BPE=2, WORD=3, CHAR=4 (the proto's default is UNIGRAM)
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    ids: dict[str, int] = field(default_factory=lambda: {"unk": 0, "bos": 1, "eos": 2, "pad": -1})
    normalizer_name: str = "nmt_nfkc"
    charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True


def _read_sentencepiece(path: Path) -> _SentencePieceModel:
    """Parse the parts of SentencePiece's ModelProto llama.cpp needs: pieces (field 1), trainer spec (2) and
    normalizer spec (3). A reader of its own keeps the sentencepiece package a test-only dependency."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TokenizerError(f"cannot read {path}: {exc.strerror or exc}") from None
    sp = _SentencePieceModel([], [], [])
    try:
        for num, wire, value in _fields(data):
            if num == 1 and wire == 2:
                piece, score, kind = None, 0.0, 1
                for pn, pw, pv in _fields(value):
                    if pn == 1 and pw == 2:
                        piece = pv.decode("utf-8")
                    elif pn == 2 and pw == 5:
                        score = struct.unpack("<f", pv)[0]
                    elif pn == 3 and pw == 0:
                        kind = pv
                if piece is None or kind not in _SP_TYPES:
                    raise ValueError("piece without text or of an unknown type")
                sp.pieces.append(piece)
                sp.scores.append(score)
                sp.types.append(kind)
            elif num == 2 and wire == 2:
                for tn, tw, tv in _fields(value):
                    if tw != 0:
                        continue
                    if tn == 3:
                        sp.model_type = tv
                    elif tn == 24:
                        sp.treat_whitespace_as_suffix = bool(tv)
                    elif tn == 35:
                        sp.byte_fallback = bool(tv)
                    elif tn in (40, 41, 42, 43):
                        sp.ids[("unk", "bos", "eos", "pad")[tn - 40]] = _int32(tv)
            elif num == 3 and wire == 2:
                for nn, nw, nv in _fields(value):
                    if nn == 1 and nw == 2:
                        sp.normalizer_name = nv.decode("utf-8")
                    elif nn == 2 and nw == 2:
                        sp.charsmap = bytes(nv)
                    elif nn == 3 and nw == 0:
                        sp.add_dummy_prefix = bool(nv)
                    elif nn == 4 and nw == 0:
                        sp.remove_extra_whitespaces = bool(nv)
    except (ValueError, UnicodeDecodeError, struct.error):
        raise TokenizerError(
            f"{path} is not a SentencePiece model (corrupt or truncated, or another format under that name: "
            "download it again)"
        ) from None
    if not sp.pieces:
        raise TokenizerError(f"{path} holds no SentencePiece vocabulary (the file is corrupt: download it again)")
    return sp


def _sentencepiece(path: Path, n_vocab: int | None, overlay: list[tuple[int, str, bool]]) -> Vocabulary:
    sp = _read_sentencepiece(path)
    if sp.model_type != 2:
        kind = {1: "unigram", 3: "word", 4: "char"}.get(sp.model_type, str(sp.model_type))
        raise TokenizerError(
            f"{path} is a SentencePiece {kind} model; llama.cpp reproduces SentencePiece BPE models only "
            "(Llama 2, Gemma); convert this model with llama.cpp's convert_hf_to_gguf.py"
        )
    if sp.charsmap or sp.remove_extra_whitespaces or sp.treat_whitespace_as_suffix:
        what = (
            "normalizes text"
            if sp.charsmap
            else "collapses whitespace"
            if sp.remove_extra_whitespaces
            else "puts spaces after words"
        )
        raise TokenizerError(
            f"{path}: the SentencePiece model {what} ({sp.normalizer_name}), which llama.cpp's SentencePiece "
            "tokenizer does not do, so its tokens would differ (convert it with llama.cpp's convert_hf_to_gguf.py)"
        )
    size = _size(len(sp.pieces), n_vocab, str(path))
    tokens: list[str | None] = [*sp.pieces, *([None] * (size - len(sp.pieces)))]
    scores = [*sp.scores, *([-1000.0] * (size - len(sp.pieces)))]
    types = [*sp.types, *([int(T.UNUSED)] * (size - len(sp.pieces)))]
    # Tokens the checkpoint adds or re-marks (tokenizer_config.json, tokenizer.json): control when special,
    # user-defined otherwise, written as plain text as llama.cpp expects user-defined tokens. Ids past the
    # embedding (placeholders of a multimodal sibling) cannot be produced by this model and are left out.
    for tid, content, special in overlay:
        if tid >= size:
            continue
        if special or _looks_special(content):
            types[tid] = int(T.CONTROL)
        else:
            content = content.replace(_SPIECE_SPACE, " ")
            types[tid] = int(T.USER_DEFINED)
        tokens[tid] = content
        scores[tid] = -1000.0
    out = _fill_gaps(tokens, types, scores, -1000.0)
    _check_unique(out, str(path))
    _check_byte_tokens(out, types, str(path))
    special_ids = {k: v for k, v in sp.ids.items() if 0 <= v < size}
    return Vocabulary(
        "llama",
        "default",
        out,
        types,
        scores=scores,
        add_space_prefix=sp.add_dummy_prefix,
        source=str(path),
        special_ids=special_ids,
    )


# -- SentencePiece BPE written as tokenizer.json ------------------------------------------------


def _spm_json_prefix(tj: dict[str, Any], path: Path) -> bool:
    """Whether a SentencePiece-style tokenizer.json adds a leading ``▁`` (Llama 2) or not (Gemma), from its
    normalizer (Prepend + Replace) or its Metaspace pre-tokenizer; anything else is refused."""
    norm, pre = tj.get("normalizer"), tj.get("pre_tokenizer")
    steps = norm.get("normalizers", []) if isinstance(norm, dict) and norm.get("type") == "Sequence" else [norm]
    steps = [s for s in steps if s is not None]
    kinds = [s.get("type") if isinstance(s, dict) else None for s in steps]
    replace_space = any(
        isinstance(s, dict)
        and s.get("type") == "Replace"
        and (s.get("pattern") or {}).get("String") == " "
        and s.get("content") == _SPIECE_SPACE
        for s in steps
    )
    if pre is None and replace_space and set(kinds) <= {"Prepend", "Replace"}:
        return "Prepend" in kinds
    if not steps and isinstance(pre, dict) and pre.get("type") == "Metaspace" and not pre.get("split", True):
        if pre.get("replacement") == _SPIECE_SPACE:
            return pre.get("prepend_scheme", "always" if pre.get("add_prefix_space", True) else "never") != "never"
    raise TokenizerError(
        f"{path}: a BPE tokenizer with byte fallback whose whitespace handling is not SentencePiece's "
        "(no tokenizer.model beside it either); convert this model with llama.cpp's convert_hf_to_gguf.py"
    )


def _spm_json(tj: dict[str, Any], path: Path, n_vocab: int | None) -> Vocabulary:
    model = tj["model"]
    add_prefix = _spm_json_prefix(tj, path)
    vocab = _model_vocab(model, path)
    merges = _model_merges(model, vocab, path)
    # llama.cpp's SentencePiece tokenizer merges the adjacent pair whose joined piece scores highest, as
    # SentencePiece does. The merge list orders merges by the joined piece's score, so a piece's score is
    # minus the rank of the first merge that yields it; pieces no merge yields (characters, bytes, special
    # tokens) score below all of them.
    floor = -float(len(merges) + 1)
    score_of: dict[str, float] = {}
    for rank, m in enumerate(merges):
        left, right = m.split(" ")
        score_of.setdefault(left + right, -float(rank))
    added = _added_tokens(tj, path)
    tokens, types, size = _token_table(vocab, added, n_vocab, path)
    unk = model.get("unk_token")
    scores = [floor] * size
    for i, t in enumerate(tokens):
        if t is None:
            continue
        if types[i] == int(T.NORMAL):
            if _BYTE_TOKEN.fullmatch(t):
                types[i] = int(T.BYTE)
            elif t == unk:
                types[i] = int(T.UNKNOWN)
            scores[i] = score_of.get(t, floor)
        elif types[i] == int(T.USER_DEFINED):
            tokens[i] = t.replace(_SPIECE_SPACE, " ")
    out = _fill_gaps(tokens, types, scores, -1000.0)
    _check_unique(out, str(path))
    _check_byte_tokens(out, types, str(path))
    return Vocabulary("llama", "default", out, types, scores=scores, add_space_prefix=add_prefix, source=str(path))


# -- choosing the source ------------------------------------------------------------------------


def _config_added_tokens(checkpoint_dir: Path) -> list[tuple[int, str, bool]]:
    """Added tokens named outside tokenizer.json: ``added_tokens.json`` and tokenizer_config.json's
    ``added_tokens_decoder`` (the latter wins: it also says which are special)."""
    out: dict[int, tuple[int, str, bool]] = {}
    extra = _optional_json(checkpoint_dir / "added_tokens.json")
    for content, tid in extra.items():
        if isinstance(tid, int) and not isinstance(tid, bool) and tid >= 0:
            out[tid] = (tid, content, False)
    config = _optional_json(checkpoint_dir / "tokenizer_config.json")
    decoder = config.get("added_tokens_decoder") or {}
    if isinstance(decoder, dict):
        for key, entry in decoder.items():
            if not (isinstance(key, str) and key.isdigit() and isinstance(entry, dict)):
                continue
            content = entry.get("content")
            if isinstance(content, str):
                out[int(key)] = (int(key), content, bool(entry.get("special", False)))
    return [out[k] for k in sorted(out)]


def load_vocabulary(checkpoint_dir: Path, arch: str = "", *, n_vocab: int | None = None) -> Vocabulary:
    """Read the checkpoint's tokenizer into a :class:`Vocabulary` (tokens, types, scores or merges, the
    tokenizer model and pre-tokenizer names), padded with unused tokens up to ``n_vocab`` when given.

    Byte-level BPE comes from ``tokenizer.json``; SentencePiece from ``tokenizer.model`` when it is there
    (the exact piece scores llama.cpp merges by), else from a SentencePiece-style ``tokenizer.json``.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise TokenizerError(f"checkpoint folder not found: {checkpoint_dir} (give the folder holding config.json)")
    tj_path = checkpoint_dir / "tokenizer.json"
    sp_path = checkpoint_dir / "tokenizer.model"
    tj: dict[str, Any] | None = None
    if tj_path.is_file():
        tj = _read_json(tj_path)
        if not isinstance(tj, dict) or not isinstance(tj.get("model"), dict):
            raise TokenizerError(f"{tj_path} has no tokenizer model (the file is corrupt: download it again)")
        kind = tj["model"].get("type", "BPE" if "merges" in tj["model"] else None)
        if kind == "BPE" and _is_byte_level(tj):
            return _byte_level_bpe(tj, tj_path, n_vocab)
    if sp_path.is_file():
        overlay = _added_tokens(tj, tj_path) if tj is not None else []
        by_id = {a[0]: a for a in overlay}
        by_id.update({a[0]: a for a in _config_added_tokens(checkpoint_dir)})
        return _sentencepiece(sp_path, n_vocab, [by_id[k] for k in sorted(by_id)])
    if tj is not None:
        kind = tj["model"].get("type", "BPE" if "merges" in tj["model"] else None)
        if kind == "BPE" and tj["model"].get("byte_fallback", False):
            return _spm_json(tj, tj_path, n_vocab)
        raise TokenizerError(
            f"{tj_path}: a {kind or 'untyped'} tokenizer{' without byte fallback' if kind == 'BPE' else ''} is not "
            "one trimix converts (byte-level BPE or SentencePiece BPE); use llama.cpp's convert_hf_to_gguf.py"
        )
    family = f" for {arch}" if arch else ""
    raise TokenizerError(
        f"no tokenizer{family} in {checkpoint_dir} (expected tokenizer.json or tokenizer.model: copy the "
        "checkpoint's tokenizer files into the folder)"
    )


# -- special tokens, flags and the chat template ------------------------------------------------


class _Specials(gguf.SpecialVocab):
    """gguf's reader of special-token ids, add-BOS/EOS flags and the chat template (tokenizer_config.json,
    the post-processor, config.json, chat_template.jinja), made tolerant of the -1 some configs use for
    "no such token" instead of failing the conversion on it."""

    def _set_special_token(self, typ: str, tid: Any) -> None:
        if isinstance(tid, int) and not isinstance(tid, bool) and tid < 0:
            return
        super()._set_special_token(typ, tid)


def _first_id(value: Any) -> int | None:
    if isinstance(value, list) and value:
        value = value[0]
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def write_tokenizer(writer: gguf.GGUFWriter, checkpoint_dir: Path, arch: str, *, n_vocab: int | None = None) -> None:
    """Add the checkpoint's tokenizer to ``writer`` as the ``tokenizer.ggml.*`` keys llama.cpp reads.

    Everything is read and checked before the first key is added, so a bad tokenizer fails with one line
    and leaves the writer untouched. ``n_vocab`` is the embedding's row count: the vocabulary is padded with
    unused ``[PAD<id>]`` tokens up to it (Qwen2.5's 151,936 rows over 151,665 tokens), and a tokenizer with
    more ids than rows is refused.
    """
    checkpoint_dir = Path(checkpoint_dir)
    vocab = load_vocabulary(checkpoint_dir, arch, n_vocab=n_vocab)
    # Parse every JSON file SpecialVocab will read, so a corrupt one fails here with its name and position.
    for name in ("tokenizer_config.json", "config.json", "special_tokens_map.json"):
        _optional_json(checkpoint_dir / name)
    generation = _optional_json(checkpoint_dir / "generation_config.json")
    gguf_log = logging.getLogger("gguf.vocab")
    level = gguf_log.level
    gguf_log.setLevel(logging.ERROR)  # its notes on ignored entries are not the user's concern
    try:
        specials = _Specials(checkpoint_dir, load_merges=False, n_vocab=len(vocab))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise TokenizerError(f"{checkpoint_dir}: the special-token settings are malformed ({exc})") from None
    finally:
        gguf_log.setLevel(level)
    ids = specials.special_token_ids
    # generation_config.json names the ids generation stops at and starts with; the tokenizer model's own
    # (SentencePiece's trainer spec) come last.
    for typ in ("bos", "eos", "pad"):
        tid = _first_id(generation.get(f"{typ}_token_id"))
        if typ not in ids and tid is not None and tid < len(vocab):
            ids[typ] = tid
    for typ, tid in vocab.special_ids.items():
        ids.setdefault(typ, tid)
    if specials.chat_template is None:
        jinja = checkpoint_dir / "chat_template.jinja"
        if jinja.is_file():
            try:
                specials.chat_template = jinja.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise TokenizerError(f"cannot read {jinja} as UTF-8 text ({exc})") from None
    if vocab.model == "llama":
        # SentencePiece models begin with BOS unless the checkpoint says otherwise; say so explicitly.
        specials.add_special_token.setdefault("bos", True)
        specials.add_special_token.setdefault("eos", False)

    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    specials.add_to_gguf(writer, quiet=True)
