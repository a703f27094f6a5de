"""Tiny llama-architecture GGUF models written by the test suite itself, in milliseconds.

Real llama.cpp loads and runs them, so every test that uses them exercises the same code path as a
published model. The vocabulary is SentencePiece-style with byte fallback: ``<unk>``, ``<s>``,
``</s>``, the 256 byte tokens ``<0x00>``..``<0xFF>``, ASCII pieces and merges, and a few whole
Tibetan and Uyghur characters, so text in those scripts tokenizes into a mix of character tokens and
byte tokens that each carry part of a character.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

ASCII = [chr(c) for c in range(0x21, 0x7F)]
MERGES = ["▁t", "th", "he", "▁the", "in", "an", "er", "▁a", "on", "▁of", "▁and", "ing", "▁to", "es", "re"]
NONLATIN = ["ཀ", "ག", "་", "བ", "ོ", "ད", "ئ", "ا", "ۇ", "ي", "غ", "ۇر"]

TOKEN_TYPE_NORMAL, TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL = 1, 2, 3
TOKEN_TYPE_UNUSED, TOKEN_TYPE_BYTE = 5, 6


def vocabulary(n_pad: int = 0, swap: tuple[int, int] | None = None) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types; ``n_pad`` unused padding entries go at the end; ``swap``
    exchanges two pieces (a vocabulary that looks alike but does not fuse)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_CONTROL] + [TOKEN_TYPE_BYTE] * 256
    scores = [0.0, 0.0, 0.0] + [0.0] * 256
    pieces = ["▁", *ASCII, *MERGES, *NONLATIN]
    for i, p in enumerate(pieces):
        tokens.append(p)
        types.append(TOKEN_TYPE_NORMAL)
        scores.append(-float(i) if len(p) == 1 else float(len(p)) - i * 1e-3)
    for _ in range(n_pad):
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(TOKEN_TYPE_UNUSED)
        scores.append(-1e4)
    if swap is not None:
        a, b = swap
        tokens[a], tokens[b] = tokens[b], tokens[a]
    return tokens, scores, types


def write_tiny_llama(
    path: Path,
    seed: int = 0,
    *,
    n_embd: int = 32,
    n_layer: int = 2,
    n_head: int = 4,
    n_ff: int = 64,
    n_ctx: int = 512,
    n_pad: int = 0,
    swap: tuple[int, int] | None = None,
    logit_scale: float = 1.0,
    split_max_tensors: int = 0,
) -> Path:
    """Write a random llama model to ``path``; different seeds give different models. With
    ``split_max_tensors`` the model is split in parts of that many tensors, named as llama.cpp's
    split files are (``STEM-00001-of-0000N.gguf``, ...), and the first part's path is returned."""
    tokens, scores, types = vocabulary(n_pad, swap)
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama", split_max_tensors=split_max_tensors)
    w.add_name(f"tiny-llama-{seed}")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    def t(*shape: int, scale: float) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w.add_tensor("token_embd.weight", t(n_vocab, n_embd, scale=1.0))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", t(n_embd, n_embd, scale=n_embd**-0.5))
        w.add_tensor(f"blk.{i}.attn_k.weight", t(n_embd, n_embd, scale=n_embd**-0.5))
        w.add_tensor(f"blk.{i}.attn_v.weight", t(n_embd, n_embd, scale=n_embd**-0.5))
        w.add_tensor(f"blk.{i}.attn_output.weight", t(n_embd, n_embd, scale=n_embd**-0.5))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", t(n_ff, n_embd, scale=n_embd**-0.5))
        w.add_tensor(f"blk.{i}.ffn_up.weight", t(n_ff, n_embd, scale=n_embd**-0.5))
        w.add_tensor(f"blk.{i}.ffn_down.weight", t(n_embd, n_ff, scale=n_ff**-0.5))
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    w.add_tensor("output.weight", t(n_vocab, n_embd, scale=logit_scale * n_embd**-0.5 * 3.0))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if split_max_tensors:
        return path.with_name(f"{path.stem}-00001-of-{len(w.tensors):05d}.gguf")
    return path


# -- raw GGUF files, for corrupting on purpose ----------------------------------------------------
#
# GGUFWriter refuses most malformed input, and a test of the validator needs exactly that input: a
# value of the wrong type, a count that lies, an offset out of the file. So these helpers hold a
# GGUF file as plain parts (key-value pairs, tensor infos, the data blob) and serialize them without
# any check, recording where every field landed so a test can overwrite it in place.

V = gguf.GGUFValueType
_SCALAR_FORMATS = {
    V.UINT8: "<B",
    V.INT8: "<b",
    V.UINT16: "<H",
    V.INT16: "<h",
    V.UINT32: "<I",
    V.INT32: "<i",
    V.FLOAT32: "<f",
    V.BOOL: "<B",
    V.UINT64: "<Q",
    V.INT64: "<q",
    V.FLOAT64: "<d",
}


@dataclass
class RawKV:
    """One key-value pair. For ``V.ARRAY`` the value is ``(item_type, items)``; items of a nested
    array are ``(item_type, items)`` tuples too."""

    key: str
    vtype: int
    value: Any


@dataclass
class RawTensor:
    name: str
    dims: list[int]
    ggml_type: int
    offset: int


@dataclass
class RawGGUF:
    """A GGUF file as parts; :meth:`pack` writes them as they are, right or wrong."""

    kvs: list[RawKV]
    tensors: list[RawTensor]
    data: bytes
    alignment: int = 32
    version: int = 3
    layout: dict[str, int] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> RawGGUF:
        """The parts of a well-formed file (read with the ``gguf`` package's own reader)."""
        r = gguf.GGUFReader(str(path))
        kvs = []
        for name, f in r.fields.items():
            if name.startswith("GGUF."):
                continue
            if f.types[0] == V.ARRAY:
                kvs.append(RawKV(name, V.ARRAY, (f.types[1], list(f.contents()))))
            else:
                kvs.append(RawKV(name, f.types[0], f.contents()))
        tensors = [
            RawTensor(t.name, [int(d) for d in t.shape], int(t.tensor_type), int(t.data_offset - r.data_offset))
            for t in r.tensors
        ]
        data = Path(path).read_bytes()[r.data_offset :]
        return cls(kvs, tensors, data, alignment=r.alignment)

    def kv(self, key: str) -> RawKV:
        return next(kv for kv in self.kvs if kv.key == key)

    def set(self, key: str, vtype: int, value: Any) -> RawGGUF:
        """Replace (or append) ``key`` with a value of any type."""
        for kv in self.kvs:
            if kv.key == key:
                kv.vtype, kv.value = vtype, value
                return self
        self.kvs.append(RawKV(key, vtype, value))
        return self

    def drop(self, key: str) -> RawGGUF:
        self.kvs = [kv for kv in self.kvs if kv.key != key]
        return self

    def tensor(self, name: str) -> RawTensor:
        return next(t for t in self.tensors if t.name == name)

    def retype(self, name: str, ggml_type: int, dims: list[int] | None = None) -> RawGGUF:
        """Give tensor ``name`` another type (and shape), with zero data of the right size, and lay
        the data section out again so that the file stays well formed."""
        blobs = []
        for t in self.tensors:
            size = _nbytes(t.dims, t.ggml_type)
            blob = self.data[t.offset : t.offset + size]
            if t.name == name:
                t.ggml_type = ggml_type
                t.dims = list(dims or t.dims)
                blob = bytes(_nbytes(t.dims, ggml_type))
            blobs.append(blob)
        data = bytearray()
        for t, blob in zip(self.tensors, blobs):
            t.offset = len(data)
            data += blob + bytes(-len(blob) % self.alignment)
        self.data = bytes(data)
        return self

    def pack(self, *, n_tensors: int | None = None, n_kv: int | None = None) -> bytes:
        """The file's bytes; :attr:`layout` then maps ``"n_kv"``, ``"kv:KEY:key_len"``,
        ``"kv:KEY:type"``, ``"kv:KEY:item_type"``, ``"kv:KEY:count"``, ``"kv:KEY:value"``,
        ``"tensor:NAME:name_len"``, ``"tensor:NAME:n_dims"``, ``"tensor:NAME:dim0"``...,
        ``"tensor:NAME:type"``, ``"tensor:NAME:offset"`` and ``"data"`` to their byte offsets."""
        out = bytearray()
        lay: dict[str, int] = {}
        out += struct.pack("<4sI", b"GGUF", self.version)
        lay["n_tensors"] = len(out)
        out += struct.pack("<Q", len(self.tensors) if n_tensors is None else n_tensors)
        lay["n_kv"] = len(out)
        out += struct.pack("<Q", len(self.kvs) if n_kv is None else n_kv)
        for kv in self.kvs:
            p = f"kv:{kv.key}:"
            lay[p + "key_len"] = len(out)
            _put_str(out, kv.key)
            lay[p + "type"] = len(out)
            out += struct.pack("<I", kv.vtype)
            if kv.vtype == V.ARRAY:
                lay[p + "item_type"] = len(out)
                lay[p + "count"] = len(out) + 4
            lay[p + "value"] = len(out) + (12 if kv.vtype == V.ARRAY else 0)
            _put_value(out, kv.vtype, kv.value)
        for t in self.tensors:
            p = f"tensor:{t.name}:"
            lay[p + "name_len"] = len(out)
            _put_str(out, t.name)
            lay[p + "n_dims"] = len(out)
            out += struct.pack("<I", len(t.dims))
            for i, d in enumerate(t.dims):
                lay[f"{p}dim{i}"] = len(out)
                out += struct.pack("<Q", d)
            lay[p + "type"] = len(out)
            out += struct.pack("<I", t.ggml_type)
            lay[p + "offset"] = len(out)
            out += struct.pack("<Q", t.offset)
        out += bytes(-len(out) % self.alignment)
        lay["data"] = len(out)
        out += self.data
        self.layout = lay
        return bytes(out)

    def write(self, path: Path, **counts: int) -> Path:
        path.write_bytes(self.pack(**counts))
        return path


def _nbytes(dims: list[int], ggml_type: int) -> int:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    n = 1
    for d in dims:
        n *= d
    return n // block * size


def _put_str(out: bytearray, s: str | bytes) -> None:
    b = s.encode("utf-8") if isinstance(s, str) else s
    out += struct.pack("<Q", len(b)) + b


def _put_value(out: bytearray, vtype: int, value: Any) -> None:
    if vtype == V.STRING:
        _put_str(out, value)
    elif vtype == V.ARRAY:
        item_type, items = value
        out += struct.pack("<IQ", item_type, len(items))
        for item in items:
            _put_value(out, item_type, item)
    elif vtype in _SCALAR_FORMATS:
        out += struct.pack(_SCALAR_FORMATS[V(vtype)], value)
    else:  # a type no reader knows: write four bytes of something
        out += struct.pack("<I", int(value) if isinstance(value, int) else 0)


def tiny_raw(tmp_dir: Path, seed: int = 0, **kwargs: Any) -> RawGGUF:
    """The parts of a fresh tiny llama model (see :func:`write_tiny_llama` for ``kwargs``)."""
    path = write_tiny_llama(tmp_dir / f"tiny-raw-{seed}.gguf", seed, **kwargs)
    return RawGGUF.read(path)
