"""Corrupt GGUF files: every one ends in a valid run or in one clear line, never in a signal.

llama.cpp trusts much of what a GGUF file says: a block count of zero, a NaN norm epsilon, two tokens
with the same text or a norm weight in F16 abort the whole process (SIGABRT, or SIGSEGV), which no
Python code can catch. This suite writes about 200 broken variants of a tiny model (lying header
counts, string lengths past the end of the file, unknown value and tensor types, tensors outside the
file, truncations, flipped bytes, impossible hyper-parameters and vocabularies) and runs
``trimix generate`` and ``trimix inspect`` on each: a few through the ``trimix`` command itself, all
of them through one driver process that calls the same command-line entry point file after file.
"""

from __future__ import annotations

import copy
import json
import math
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import gguf
import pytest
from commands import trimix
from tinygguf import RawGGUF, RawKV, RawTensor, V, tiny_raw, write_tiny_llama

from trimix_cpp import ModelFileError
from trimix_cpp.gguf_check import check_gguf

NAN = math.nan
U64_MAX = 2**64 - 1
Q = gguf.GGMLQuantizationType
# "é" is not in the tiny vocabulary: the prompt needs the byte-fallback tokens, as Tibetan does.
PROMPT = "hi é"


def generate_args(path: Path, *extra: str) -> list[str]:
    return ["generate", "--method", "single", "--large-ins", str(path), "-n", "4", "--n-ctx", "64", *extra, PROMPT]


def build_variants(tmp: Path) -> dict[str, tuple[bytes, str | None]]:
    """Variants of one tiny llama model: name -> (file bytes, text the error must contain, if the
    header check is to reject it; None when llama.cpp may run it or refuse it on its own)."""
    base_path = write_tiny_llama(tmp / "base.gguf")
    pristine = RawGGUF.read(base_path)
    base = pristine.pack()
    lay = dict(pristine.layout)
    tokens = list(pristine.kv("tokenizer.ggml.tokens").value[1])
    types = list(pristine.kv("tokenizer.ggml.token_type").value[1])
    n_vocab = len(tokens)
    out: dict[str, tuple[bytes, str | None]] = {
        "valid": (base, None),
        "version-2": (base[:4] + b"\2\0\0\0" + base[8:], None),
    }

    def add(name: str, data: bytes, expect: str | None = None) -> None:
        assert name not in out, name
        out[name] = (data, expect)

    def fresh() -> RawGGUF:
        return copy.deepcopy(pristine)

    def kv(key: str, vtype: int, value: object) -> bytes:
        return fresh().set(key, vtype, value).pack()

    def patch(where: str, fmt: str, value: int) -> bytes:
        data = bytearray(base)
        struct.pack_into(fmt, data, lay[where], value)
        return bytes(data)

    # -- header
    add("magic", b"GGUX" + base[4:], "not a GGUF file")
    for v in (0, 1, 4, 0x03000000):
        add(f"version-{v}", base[:4] + struct.pack("<I", v) + base[8:], f"GGUF version {v}")
    n_tensors, n_kv = len(pristine.tensors), len(pristine.kvs)
    for name, value, expect in [
        ("plus1", n_tensors + 1, None),
        ("minus1", n_tensors - 1, None),  # the last tensor info is read as padding: garbage weights, no crash
        ("zero", 0, None),
        ("huge", 2**40, "more than a file of"),
        ("i64max", 2**63 - 1, "more than a file of"),
        ("neg", U64_MAX, "more than a file of"),
    ]:
        add(f"n_tensors-{name}", patch("n_tensors", "<Q", value), expect)
    for name, value, expect in [
        ("plus1", n_kv + 1, None),
        ("minus1", n_kv - 1, None),
        ("zero", 0, None),
        ("huge", 2**40, "more than a file of"),
        ("neg", U64_MAX, "more than a file of"),
    ]:
        add(f"n_kv-{name}", patch("n_kv", "<Q", value), expect)

    # -- key-value strings, types and arrays
    arch = "kv:general.architecture:"
    add("key-len-zero", patch(arch + "key_len", "<Q", 0), "key 0 is empty")
    add("key-len-huge", patch(arch + "key_len", "<Q", 2**40), "has length 1099511627776, past the end")
    add("key-len-max", patch(arch + "key_len", "<Q", U64_MAX), "past the end of the file")
    add("key-len-plus1", patch("kv:llama.block_count:key_len", "<Q", len("llama.block_count") + 1))
    add("value-str-len-huge", patch(arch + "value", "<Q", 2**62), "past the end of the file")
    add("value-str-len-plus3", patch("kv:general.name:value", "<Q", len("tiny-llama-0") + 3))
    add(
        "token-str-len-huge",
        patch("kv:tokenizer.ggml.tokens:value", "<Q", 2**50),
        "string 0 of 'tokenizer.ggml.tokens'",
    )
    for t in (13, 99, 2**32 - 1):
        add(f"kv-type-{t}", patch("kv:llama.block_count:type", "<I", t), f"value type {t}")
    add("kv-type-string-for-u32", patch("kv:llama.block_count:type", "<I", V.STRING))
    add("array-item-type-99", patch("kv:tokenizer.ggml.scores:item_type", "<I", 99), "value type 99")
    add("array-item-type-array", patch("kv:tokenizer.ggml.scores:item_type", "<I", V.ARRAY))
    add("array-count-huge", patch("kv:tokenizer.ggml.scores:count", "<Q", 2**61), "claims 2305843009213693952 items")
    add("array-count-plus1", patch("kv:tokenizer.ggml.token_type:count", "<Q", n_vocab + 1))
    add("array-count-tokens-huge", patch("kv:tokenizer.ggml.tokens:count", "<Q", 2**40), "claims 1099511627776 items")
    nested = (V.ARRAY, [(V.STRING, ["a", "b"]), (V.UINT8, [1, 2, 3])])
    add("nested-array", kv("general.tags", V.ARRAY, nested), "'general.tags' is an array of arrays")
    dup = fresh()
    dup.kvs.append(RawKV("llama.block_count", V.UINT32, 0))
    add("duplicate-key", dup.pack(), "'llama.block_count' appears twice")
    for value in (0, 3, 48):
        add(f"alignment-{value}", kv("general.alignment", V.UINT32, value), f"general.alignment is {value}")
    add("alignment-u64", kv("general.alignment", V.UINT64, 32), "general.alignment has type UINT64")

    # -- tensor infos
    t0, t1 = "tensor:token_embd.weight:", "tensor:blk.0.attn_norm.weight:"
    add("tensor-name-len-zero", patch(t1 + "name_len", "<Q", 0))
    add("tensor-name-len-huge", patch(t1 + "name_len", "<Q", 2**45), "past the end of the file")
    long_name = fresh()
    long_name.tensor("output_norm.weight").name = "x" * 70
    add("tensor-name-too-long", long_name.pack(), "name of 70 bytes")
    for n in (0, 5, 2**32 - 1):
        add(f"tensor-n_dims-{n}", patch(t0 + "n_dims", "<I", n))
    add("tensor-dim-zero", patch(t0 + "dim1", "<Q", 0), "dimension 1 of 0 elements")
    add("tensor-dim-neg", patch(t0 + "dim1", "<Q", U64_MAX), "dimension 1 of -1 elements")
    add("tensor-dim-huge", patch(t0 + "dim1", "<Q", 2**40), "past the end of the file")
    overflow = fresh()
    overflow.tensor("blk.1.attn_q.weight").dims = [2**32, 2**32]
    add("tensor-dims-overflow", overflow.pack(), "overflow a 64-bit count")
    for name, value, expect in [
        ("4-removed", 4, "ggml type 4"),
        ("99", 99, "ggml type 99"),
        ("i32max", 2**31 - 1, "ggml type 2147483647"),
        ("neg", 2**32 - 1, "ggml type 4294967295"),
        ("q4_0", Q.Q4_0, None),  # sizes and offsets no longer agree: llama.cpp refuses it
        ("q8_0", Q.Q8_0, None),
    ]:
        add(f"tensor-type-{name}", patch(t1 + "type", "<I", value), expect)
    not_multiple = fresh()
    not_multiple.tensor("blk.0.attn_norm.weight").dims = [30]
    not_multiple.tensor("blk.0.attn_norm.weight").ggml_type = Q.Q4_0
    add("tensor-type-block", not_multiple.pack(), "not a multiple of its block size 32")
    out_off = pristine.tensor("output.weight").offset
    add(
        "tensor-offset-misaligned",
        patch("tensor:output.weight:offset", "<Q", out_off + 4),
        "not a multiple of the alignment",
    )
    add("tensor-offset-huge", patch("tensor:output.weight:offset", "<Q", 2**40), "past the end of the file")
    add("tensor-offset-max", patch("tensor:output.weight:offset", "<Q", U64_MAX - 31), "past the end of the file")
    add("tensor-offset-overlap", patch("tensor:blk.0.attn_q.weight:offset", "<Q", 0), "overlap")
    dup_t = fresh()
    dup_t.tensor("blk.1.attn_norm.weight").name = "blk.0.attn_norm.weight"
    add("tensor-duplicate-name", dup_t.pack(), "'blk.0.attn_norm.weight' appears twice")
    transposed = fresh()
    transposed.tensor("token_embd.weight").dims = [n_vocab, 32]
    add("tensor-embd-transposed", transposed.pack(), "token_embd.weight has rows of 381 values")
    missing = fresh()
    missing.tensors = [t for t in missing.tensors if t.name != "output_norm.weight"]
    add("tensor-missing", missing.pack())
    add("tensor-layer-past-block_count", kv("llama.block_count", V.UINT32, 1), "belongs to layer 1")
    add("vocab-more-rows", _more_rows(fresh()), "has 445 rows but tokenizer.ggml.tokens has 381")
    # well-formed files whose tensor types llama.cpp cannot compute with (SIGSEGV or abort before)
    for tensor, qtype, expect in [
        ("blk.0.attn_norm.weight", Q.F16, "has type F16; llama.cpp computes norms"),
        ("blk.0.attn_norm.weight", Q.Q8_0, "has type Q8_0; llama.cpp computes norms"),
        ("blk.0.attn_q.weight", Q.I32, "has type I32, which llama.cpp cannot"),
        ("blk.0.attn_q.weight", Q.F64, "has type F64"),
        ("blk.0.attn_q.weight", Q.Q8_1, "has type Q8_1"),
        ("token_embd.weight", Q.I8, "has type I8"),
        ("blk.0.attn_q.weight", Q.Q4_0, None),  # a real quantization: a valid run
        ("token_embd.weight", Q.Q8_0, None),
    ]:
        add(f"weights-{tensor.split('.')[-2]}-{qtype.name}", fresh().retype(tensor, qtype).pack(), expect)

    biased = fresh()
    biased.tensors.append(RawTensor("blk.0.attn_q.bias", [32], Q.F16, len(biased.data)))
    biased.data += bytes(64)
    add("weights-bias-F16", biased.pack(), "'blk.0.attn_q.bias' has type F16")

    # -- truncations: the first four bytes are the magic, then the header, the tensor infos, the data
    data_start = lay["data"]
    for cut in (0, 3, 4, 7, 8, 12, 16, 20, 24, 30, lay["kv:tokenizer.ggml.tokens:value"] + 100,
                lay["kv:tokenizer.ggml.scores:value"] + 7, lay[t0 + "name_len"], lay[t0 + "dim0"] + 3,
                lay[t1 + "offset"] + 4, data_start - 1, data_start, data_start + 1000, len(base) - 1):  # fmt: skip
        add(f"truncated-at-{cut}", base[:cut], "not a GGUF file" if cut < 4 else "download or convert it again")

    # -- flipped bytes at seeded positions in the header, and in the tensor data
    rng = random.Random(1234)
    for i in range(24):
        data = bytearray(base)
        for _ in range(1 + i % 3):
            pos = rng.randrange(0, data_start)
            data[pos] ^= (1 << rng.randrange(8)) if i % 2 else 0xFF
        add(f"flip-header-{i}", bytes(data))
    data = bytearray(base)
    for _ in range(64):
        data[rng.randrange(data_start, len(base))] ^= 0xFF
    add("flip-data", bytes(data))

    # -- hyper-parameters llama.cpp trusts
    for key, vtype, value, expect in [
        ("llama.block_count", V.UINT32, 0, "llama.block_count is 0"),
        ("llama.block_count", V.UINT32, 2**31, "llama.block_count is 2147483648"),
        ("llama.block_count", V.UINT32, 2**32 - 1, "llama.block_count is 4294967295"),
        ("llama.block_count", V.UINT32, 513, "llama.block_count is 513"),
        ("llama.block_count", V.UINT32, 65537, "llama.block_count is 65537"),
        ("llama.block_count", V.UINT32, 3, None),  # a layer's tensors are missing: llama.cpp says so
        ("llama.block_count", V.FLOAT32, 2.0, "llama.block_count has type FLOAT32"),
        ("llama.attention.layer_norm_rms_epsilon", V.FLOAT32, NAN, "layer_norm_rms_epsilon is nan"),
        ("llama.attention.layer_norm_rms_epsilon", V.FLOAT64, NAN, "layer_norm_rms_epsilon is nan"),
        ("llama.attention.layer_norm_rms_epsilon", V.FLOAT32, -1e-5, "layer_norm_rms_epsilon is -9.99"),
        ("llama.attention.layer_norm_rms_epsilon", V.FLOAT32, 0.0, "layer_norm_rms_epsilon is 0.0"),
        ("llama.attention.layer_norm_rms_epsilon", V.FLOAT32, math.inf, "layer_norm_rms_epsilon is inf"),
        ("llama.attention.layer_norm_epsilon", V.FLOAT32, NAN, "layer_norm_epsilon is nan"),
        ("llama.rope.freq_base", V.FLOAT32, 0.0, "llama.rope.freq_base is 0.0"),
        ("llama.rope.freq_base", V.FLOAT32, NAN, "llama.rope.freq_base is nan"),
        ("llama.rope.freq_base", V.FLOAT32, -10000.0, "llama.rope.freq_base is -10000.0"),
        ("llama.rope.freq_base", V.FLOAT32, math.inf, "llama.rope.freq_base is inf"),
        ("llama.rope.freq_base", V.FLOAT32, 10000.0, None),
        ("llama.rope.freq_scale", V.FLOAT32, 0.0, "llama.rope.freq_scale is 0.0"),
        ("llama.rope.freq_scale", V.FLOAT32, NAN, "llama.rope.freq_scale is nan"),
        ("llama.rope.scale_linear", V.FLOAT32, NAN, "llama.rope.scale_linear is nan"),
        ("llama.rope.scale_linear", V.FLOAT32, 0.0, None),  # zero means "no scaling" to llama.cpp
        ("llama.rope.scaling.factor", V.FLOAT32, -2.0, "llama.rope.scaling.factor is -2.0"),
        ("llama.rope.scaling.attn_factor", V.FLOAT32, NAN, "attn_factor is nan"),
        ("llama.rope.freq_base_swa", V.FLOAT32, NAN, "freq_base_swa is nan"),
        ("llama.attention.head_count", V.UINT32, 0, None),  # llama.cpp refuses it cleanly
        ("llama.attention.head_count", V.UINT32, 3, "head_count_kv is 4 at layer 0, which does not divide"),
        ("llama.attention.head_count_kv", V.UINT32, 0, "head_count_kv is 0 at layer 0"),
        ("llama.attention.head_count_kv", V.UINT32, 3, "head_count_kv is 3 at layer 0"),
        ("llama.attention.head_count_kv", V.UINT32, 8, "head_count_kv is 8 at layer 0"),
        ("llama.attention.head_count", V.ARRAY, (V.UINT32, [4]), "head_count has 1 entries"),
        ("llama.attention.head_count", V.ARRAY, (V.UINT32, [4, 4]), None),
        ("llama.attention.head_count", V.ARRAY, (V.UINT32, [4, 0]), None),  # an attention-free layer
        ("llama.attention.head_count_kv", V.ARRAY, (V.UINT32, [4, 0]), "head_count_kv is 0 at layer 1"),
        ("llama.attention.head_count_kv", V.ARRAY, (V.UINT32, [4, 3]), "head_count_kv is 3 at layer 1"),
        ("llama.attention.head_count_kv", V.ARRAY, (V.UINT32, [4, 8]), "head_count_kv is 8 at layer 1"),
        ("llama.attention.key_length", V.UINT32, 0, "llama.attention.key_length is 0"),
        ("llama.embedding_length", V.UINT32, 0, "llama.embedding_length is 0"),
        ("llama.embedding_length", V.UINT32, 33, None),
        ("llama.embedding_length", V.UINT32, 2**31, None),
        ("llama.feed_forward_length", V.UINT32, 0, None),
        ("llama.feed_forward_length", V.ARRAY, (V.UINT32, [64, 64]), None),
        ("llama.feed_forward_length", V.ARRAY, (V.UINT32, [64] * 3), "feed_forward_length has 3 entries"),
        ("llama.context_length", V.UINT32, 0, "llama.context_length is 0"),
        ("llama.rope.dimension_count", V.UINT32, 0, None),
        ("llama.rope.dimension_count", V.UINT32, 7, "rope.dimension_count is 7"),
        ("llama.rope.dimension_count", V.UINT32, 1000, "rope.dimension_count is 1000"),
        ("llama.expert_count", V.UINT32, 4, "expert_used_count is 0 and llama.expert_count is 4"),
        ("llama.expert_used_count", V.UINT32, 2, "expert_used_count is 2 and llama.expert_count is 0"),
        ("tokenizer.ggml.bos_token_id", V.UINT32, n_vocab, f"bos_token_id is {n_vocab}, outside"),
        ("tokenizer.ggml.bos_token_id", V.UINT32, 2**32 - 1, None),  # "no token", as converters write it
        ("tokenizer.ggml.eos_token_id", V.UINT32, n_vocab + 5, f"eos_token_id is {n_vocab + 5}"),
        ("tokenizer.ggml.unknown_token_id", V.UINT32, 2**31, "unknown_token_id is 2147483648"),
        ("tokenizer.ggml.padding_token_id", V.UINT32, n_vocab, "padding_token_id is 381"),
        ("tokenizer.ggml.bos_token_id", V.STRING, "1", "bos_token_id has type STRING"),
        ("general.file_type", V.UINT32, 12345, None),
        ("tokenizer.ggml.add_bos_token", V.STRING, "yes", None),
    ]:
        shown = value if vtype != V.ARRAY else "-".join(map(str, value[1]))
        add(f"hp-{key.split('.', 1)[1]}-{V(vtype).name}-{shown}", kv(key, vtype, value), expect)
    add(
        "hp-experts-used-gt-count",
        fresh().set("llama.expert_count", V.UINT32, 2).set("llama.expert_used_count", V.UINT32, 4).pack(),
        "expert_used_count is 4 and llama.expert_count is 2",
    )
    add(
        "hp-head_count-not-dividing-embedding",
        fresh().set("llama.attention.head_count", V.UINT32, 3).set("llama.attention.head_count_kv", V.UINT32, 3).pack(),
        "head_count 3 does not divide llama.embedding_length 32",
    )
    add("arch-missing", fresh().drop("general.architecture").pack(), "general.architecture is missing")
    add("arch-u32", kv("general.architecture", V.UINT32, 7), "general.architecture has type UINT32")
    add("arch-unknown", kv("general.architecture", V.STRING, "bogus"), "bogus.block_count is missing")
    add("arch-empty", kv("general.architecture", V.STRING, ""), "general.architecture is empty")
    add("block_count-missing", fresh().drop("llama.block_count").pack(), "llama.block_count is missing")
    add("head_count-missing", fresh().drop("llama.attention.head_count").pack())

    # -- vocabulary
    def vocab(toks: list, typs: list | None = None) -> bytes:
        raw = fresh().set("tokenizer.ggml.tokens", V.ARRAY, (V.STRING, toks))
        if typs is not None:
            raw.set("tokenizer.ggml.token_type", V.ARRAY, (V.INT32, typs))
        return raw.pack()

    add("tokens-empty", kv("tokenizer.ggml.tokens", V.ARRAY, (V.STRING, [])), "tokenizer.ggml.tokens is empty")
    add("tokens-ints", kv("tokenizer.ggml.tokens", V.ARRAY, (V.INT32, list(range(n_vocab)))), "ARRAY of INT32")
    add("tokens-missing", fresh().drop("tokenizer.ggml.tokens").pack(), "tokenizer.ggml.tokens is missing")
    add("scores-short", kv("tokenizer.ggml.scores", V.ARRAY, (V.FLOAT32, [0.0] * (n_vocab - 1))), "scores has 380")
    add("token_type-short", kv("tokenizer.ggml.token_type", V.ARRAY, (V.INT32, [1] * 10)), "token_type has 10")
    add("token_type-99", kv("tokenizer.ggml.token_type", V.ARRAY, (V.INT32, [*types[:-1], 99])))
    add("token-duplicate", vocab([*tokens[:300], "<s>", *tokens[301:]]), "tokens 1 and 300")
    add("token-duplicate-byte", vocab([*tokens[:3], "<", *tokens[4:]]), "are both '<'")
    add("token-byte-type-short-text", vocab([*tokens[:3], "<@", *tokens[4:]]))
    add("token-byte-type-on-normal", vocab(tokens, [*types[:300], 6, *types[301:]]))
    add("token-empty-text", vocab([*tokens[:300], "", *tokens[301:]]))
    add("token-bad-utf8", vocab([*tokens[:300], b"\xff\xfe", *tokens[301:]]))
    no_bytes = [f"[B{i}]" if 3 <= i < 259 else t for i, t in enumerate(tokens)]
    normal = [1 if 3 <= i < 259 else t for i, t in enumerate(types)]
    add("spm-without-byte-tokens", vocab(no_bytes, normal), "lacks the byte token <0x00>")
    for model, expect in [
        ("none", "tokenizer.ggml.model is 'none'"),
        ("no_vocab", "tokenizer.ggml.model is 'no_vocab'"),
        ("bert", "token 3 of the WordPiece vocabulary has type BYTE"),
        ("bogus", None),
        ("gpt2", None),
        ("t5", None),
    ]:
        add(f"tokenizer-model-{model}", kv("tokenizer.ggml.model", V.STRING, model), expect)
    add("tokenizer-model-missing", fresh().drop("tokenizer.ggml.model").pack(), "tokenizer.ggml.model is missing")
    merges = fresh().set("tokenizer.ggml.model", V.STRING, "gpt2")
    add("tokenizer-gpt2-bad-merges", merges.set("tokenizer.ggml.merges", V.ARRAY, (V.STRING, ["t h", "bad"])).pack())
    return out


def _more_rows(raw: RawGGUF) -> bytes:
    """token_embd.weight (the first tensor, F32) with 64 rows more than the vocabulary has tokens."""
    t = raw.tensor("token_embd.weight")
    end, extra = t.dims[0] * t.dims[1] * 4, 64 * t.dims[0] * 4
    assert t.offset == 0 and end % raw.alignment == 0 and extra % raw.alignment == 0
    t.dims = [t.dims[0], t.dims[1] + 64]
    raw.data = raw.data[:end] + bytes(extra) + raw.data[end:]
    for other in raw.tensors:
        if other is not t:
            other.offset += extra
    return raw.pack()


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str | None]]:
    folder = tmp_path_factory.mktemp("corrupt")
    files = {}
    for name, (data, expect) in build_variants(folder).items():
        path = folder / f"{name}.gguf"
        path.write_bytes(data)
        files[name] = (path, expect)
    return files


# One process runs the command line on every file, as the ``trimix`` console script does: the entry
# point comes from the installed metadata, so it follows the CLI wherever its package lives. Each run
# is announced before it starts, so a signal names the file that caused it.
DRIVER = r"""
import io, json, sys
from importlib.metadata import entry_points

main = next(iter(entry_points(group="console_scripts", name="trimix"))).load()
real_out = sys.stdout
for line in sys.stdin:
    name, args = json.loads(line)
    print("START " + json.dumps([name, args[0]]), file=real_out, flush=True)
    sys.argv = ["trimix", *args]
    sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = sys.stdout.getvalue(), sys.stderr.getvalue()
    sys.stdout, sys.stderr = real_out, sys.__stderr__
    print("END " + json.dumps({"name": name, "cmd": args[0], "code": code, "out": out, "err": err}), flush=True)
"""


def check_outcome(name: str, cmd: str, code: int, out: str, err: str, expect: str | None) -> str:
    """'error' or 'ok', after asserting that the run ended in one of the two allowed ways."""
    where = f"{cmd} on {name}"
    assert code in (0, 1), f"{where}: exit code {code}\n{err}"
    assert "Traceback" not in err, f"{where}:\n{err}"
    if code == 1:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), f"{where}: stderr is not one error line:\n{err}"
        assert "rerun with --verbose for the traceback" not in err, f"{where}: an unexpected exception: {err}"
        if expect is not None:
            assert expect in err, f"{where}: expected {expect!r} in {err!r}"
        return "error"
    assert expect is None, f"{where}: ran although the header check should reject it ({expect!r})"
    if cmd == "generate":
        assert "stop:" in err and "error" not in err, f"{where}: {err!r}"
    else:
        assert "fusable" in out and "not fusable" not in out, f"{where}: {out!r}"
    return "ok"


@pytest.mark.slow
def test_no_variant_crashes_the_cli(variants):
    assert len(variants) >= 100
    jobs = []
    for name, (path, _) in variants.items():
        # one thread: llama.cpp's spinning worker threads are slow on a busy machine, and the header
        # values under test do not depend on the thread count
        jobs.append([name, generate_args(path, "--threads", "1")])
        jobs.append([name, ["inspect", str(path)]])
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER],
        input="".join(json.dumps(j) + "\n" for j in jobs).encode(),
        capture_output=True,
        timeout=600,
    )
    stdout = proc.stdout.decode(errors="replace")
    starts = [json.loads(line[6:]) for line in stdout.splitlines() if line.startswith("START ")]
    ends = [json.loads(line[4:]) for line in stdout.splitlines() if line.startswith("END ")]
    if proc.returncode != 0 or len(ends) != len(jobs):
        last = starts[-1] if starts else None
        pytest.fail(
            f"the driver ended with code {proc.returncode} (negative: killed by a signal) during {last}; "
            f"stderr: {proc.stderr.decode(errors='replace')[-2000:]}"
        )
    outcome: dict[str, dict[str, str]] = {}
    failures = []
    for r in ends:
        try:
            outcome.setdefault(r["name"], {})[r["cmd"]] = check_outcome(
                r["name"], r["cmd"], r["code"], r["out"], r["err"], variants[r["name"]][1]
            )
        except AssertionError as e:
            failures.append(str(e).splitlines()[0])
    assert not failures, "\n".join(failures)
    # every file the header check rejects is an error for inspect too, never "fusable"
    for name, (_, expect) in variants.items():
        if expect is not None:
            assert outcome[name] == {"generate": "error", "inspect": "error"}, name
    assert outcome["valid"] == {"generate": "ok", "inspect": "ok"}
    assert time.perf_counter() - t0 < 120


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["valid", "hp-block_count-UINT32-0", "hp-attention.layer_norm_rms_epsilon-FLOAT32-nan", "token-duplicate"]
)
def test_the_trimix_command_on_representative_files(variants, name):
    path, expect = variants[name]
    for args in (generate_args(path), ["inspect", str(path)]):
        r = trimix(*args)
        assert r.returncode >= 0, f"killed by signal {-r.returncode}"
        check_outcome(name, args[0], r.returncode, r.stdout.decode(), r.stderr.decode(), expect)


# -- the header check's own messages -----------------------------------------------------------------


def _message(path: Path) -> str:
    with pytest.raises(ModelFileError) as info:
        check_gguf(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    return msg


@pytest.mark.parametrize(
    "key,vtype,value,needles",
    [
        ("llama.block_count", V.UINT32, 0, ["llama.block_count is 0", "1..512", "reconvert it"]),
        ("llama.block_count", V.UINT32, 2**31, ["llama.block_count is 2147483648"]),
        ("llama.attention.layer_norm_rms_epsilon", V.FLOAT32, NAN, ["llama.attention.layer_norm_rms_epsilon is nan"]),
        ("llama.attention.layer_norm_rms_epsilon", V.FLOAT32, -0.5, ["layer_norm_rms_epsilon is -0.5", "> 0"]),
        ("llama.rope.freq_base", V.FLOAT32, 0.0, ["llama.rope.freq_base is 0.0", "finite and > 0"]),
        ("llama.rope.freq_base", V.FLOAT32, -1.0, ["llama.rope.freq_base is -1.0"]),
        ("llama.context_length", V.UINT32, 0, ["llama.context_length is 0"]),
        ("tokenizer.ggml.eos_token_id", V.UINT32, 9999, ["tokenizer.ggml.eos_token_id is 9999", "381 tokens"]),
    ],
)
def test_message_names_key_and_value(tmp_path, key, vtype, value, needles):
    msg = _message(tiny_raw(tmp_path).set(key, vtype, value).write(tmp_path / "bad.gguf"))
    assert msg.startswith("could not load ")
    for needle in needles:
        assert needle in msg, msg


def test_message_names_tensor_and_offset(tmp_path):
    raw = tiny_raw(tmp_path)
    raw.tensor("output.weight").offset = 2**40
    msg = _message(raw.write(tmp_path / "far.gguf"))
    assert "'output.weight'" in msg and "data offset 1099511627776" in msg and "download or convert it again" in msg


def test_message_names_duplicate_token_ids_and_text(tmp_path):
    raw = tiny_raw(tmp_path)
    tokens = list(raw.kv("tokenizer.ggml.tokens").value[1])
    tokens[300] = "</s>"
    msg = _message(raw.set("tokenizer.ggml.tokens", V.ARRAY, (V.STRING, tokens)).write(tmp_path / "dup.gguf"))
    assert "tokens 2 and 300 of tokenizer.ggml.tokens are both '</s>'" in msg


def test_message_for_truncation_names_tensor_and_size(tmp_path):
    data = write_tiny_llama(tmp_path / "t.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-1000])
    msg = _message(cut)
    assert "tensor 'output.weight'" in msg and f"past the end of the file ({len(data) - 1000} bytes)" in msg
    assert "truncated" in msg


def test_published_and_tiny_models_pass(tmp_path, smollm2, gemma):
    demo = Path(__file__).resolve().parents[1] / "models" / "demo"
    paths = [
        smollm2,
        gemma,
        demo / "small-cpt.gguf",
        demo / "small-base.gguf",
        write_tiny_llama(tmp_path / "tiny.gguf"),
        write_tiny_llama(tmp_path / "padded.gguf", seed=2, n_pad=64),
        write_tiny_llama(tmp_path / "swapped.gguf", seed=3, swap=(300, 301)),
    ]
    for path in paths:
        header = check_gguf(path)
        assert header.tensors and header.n_tokens > 0, path


def test_header_check_is_fast_on_a_262144_token_vocabulary(gemma):
    import trimix_cpp.gguf_check as gc

    best = math.inf
    for _ in range(3):
        gc._checked.clear()
        t = time.perf_counter()
        header = check_gguf(gemma)
        best = min(best, time.perf_counter() - t)
    assert header.n_tokens == 262144
    assert best < 1.0, f"{best:.3f} s"  # about 0.15 s on an idle core; generous for a busy machine
