"""Reject GGUF files that would crash llama.cpp, before llama.cpp reads them.

llama.cpp trusts much of what a GGUF file says. Its own reader checks the container (lengths, counts,
types) and fails cleanly, but the model loader and the compute kernels then assert on values they take
from the file: a block count of 0 or above 512, a NaN or negative norm epsilon, expert counts that do
not add up, a per-layer KV head count that does not divide the head count, two tokens with the same
text, a SentencePiece vocabulary without its 256 byte tokens (the first character outside the
vocabulary aborts tokenization), norm weights or integer tensors of a type the CPU kernels cannot
multiply. Each of those ends the whole process with SIGABRT or SIGSEGV, which Python cannot catch,
so a user with one bad file loses the run without a word of why. Others (a zero or NaN RoPE base)
give NaN logits or empty output with no error at all.

:func:`check_gguf` reads only the header (metadata and tensor infos, never the tensor data) through a
read-only memory map, so it costs a fraction of a second and a few MiB even on a multi-GB model, and
it turns each of these cases into one line naming the file, the key or tensor, the bad value and
the fix. It is strict only where llama.cpp would crash or silently misbehave: every file that
llama.cpp's own converters write passes.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .errors import ModelFileError

__all__ = ["GGUFHeader", "TensorInfo", "check_gguf"]

MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS: more layers (or none) abort the model loader
MAX_NAME = 64  # ggml's GGML_MAX_NAME, terminating NUL included
MAX_DIMS = 4  # GGML_MAX_DIMS
NO_TOKEN = (2**32 - 1, -1)  # what converters write for "no such special token"; llama.cpp ignores it

_HEADER = 24  # magic, version, tensor count, key-value count
_MIN_KV = 8 + 1 + 4 + 1  # key length, one byte of key, type, one byte of value
_MIN_TENSOR = 8 + 1 + 4 + 8 + 4 + 8  # name length, one byte of name, n_dims, one dim, type, offset

FIX_CORRUPT = "the file is corrupt or was written by a broken converter; reconvert it"
FIX_TRUNCATED = "the file is truncated or damaged; download or convert it again"

V = gguf.GGUFValueType
_SCALARS: dict[int, struct.Struct] = {
    V.UINT8: struct.Struct("<B"),
    V.INT8: struct.Struct("<b"),
    V.UINT16: struct.Struct("<H"),
    V.INT16: struct.Struct("<h"),
    V.UINT32: struct.Struct("<I"),
    V.INT32: struct.Struct("<i"),
    V.FLOAT32: struct.Struct("<f"),
    V.BOOL: struct.Struct("<B"),
    V.UINT64: struct.Struct("<Q"),
    V.INT64: struct.Struct("<q"),
    V.FLOAT64: struct.Struct("<d"),
}
_NUMPY = {
    V.UINT8: "<u1",
    V.INT8: "<i1",
    V.UINT16: "<u2",
    V.INT16: "<i2",
    V.UINT32: "<u4",
    V.INT32: "<i4",
    V.FLOAT32: "<f4",
    V.BOOL: "<u1",
    V.UINT64: "<u8",
    V.INT64: "<i8",
    V.FLOAT64: "<f8",
}
_INTS = {V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64}
_FLOATS = {V.FLOAT32, V.FLOAT64}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")

Q = gguf.GGMLQuantizationType
# Types with a ggml type id that the CPU kernels cannot multiply or look rows up in: integer and F64
# tensors and the 8-bit formats ggml uses only for activations. A weight of one of these types
# loads, then the first matrix product dereferences a missing kernel (SIGSEGV) or aborts.
_NOT_FOR_WEIGHTS = {Q.Q8_1, Q.Q8_K, Q.I8, Q.I16, Q.I32, Q.I64, Q.F64}
_LAYER = re.compile(r"blk\.(\d+)\.")
_BYTE_TOKENS = frozenset(f"<0x{b:02X}>".encode() for b in range(256))
TOKEN_TYPE_BYTE = 6


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]
    ggml_type: int
    offset: int  # from the start of the data section
    nbytes: int


@dataclass(frozen=True)
class _KV:
    vtype: int
    value: Any = None  # scalars: the value (strings as bytes)
    item_type: int = -1  # arrays: the type of the items
    count: int = 0  # arrays: the number of items
    start: int = 0  # arrays: file offset of the first item


@dataclass
class GGUFHeader:
    """What :func:`check_gguf` read: metadata (scalars by value, arrays by type and length) and
    tensor infos."""

    path: Path
    version: int
    alignment: int
    data_offset: int
    metadata: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, tuple[int, int]] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def n_tokens(self) -> int:
        return self.arrays.get("tokenizer.ggml.tokens", (0, 0))[1]


class _Bad(Exception):
    """A problem found in the file; :func:`check_gguf` adds the path and turns it into one line."""

    def __init__(self, problem: str, fix: str = FIX_CORRUPT) -> None:
        super().__init__(problem)
        self.problem, self.fix = problem, fix


def _show(value: object, limit: int = 60) -> str:
    """A value from the file, printable and short whatever bytes it holds."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, float):
        return repr(value)
    text = ascii(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Files already checked in this process, by identity and modification, so that the several places
# that check a file before loading it (the engine, the model loader, inspect) read it once.
_checked: dict[tuple[Any, ...], GGUFHeader] = {}


def check_gguf(path: str | Path) -> GGUFHeader:
    """Read the header of the GGUF file at ``path`` and raise :class:`ModelFileError` with one line
    naming the key or tensor, the bad value and the fix when llama.cpp would crash or misbehave on
    it."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise ModelFileError(f"cannot read {path}: {e.strerror} (check the path and its permissions)") from None
    key = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _checked:
        return _checked[key]
    try:
        with path.open("rb") as handle:
            if st.st_size < _HEADER:
                raise _Bad(
                    f"the file is {st.st_size} bytes, shorter than a GGUF header ({_HEADER} bytes)", FIX_TRUNCATED
                )
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                reader = _Reader(buf, len(buf), path)
                header = reader.read()
                _check_model(header, reader)
    except _Bad as bad:
        raise ModelFileError(f"could not load {path}: {bad.problem} ({bad.fix})") from None
    except OSError as e:
        raise ModelFileError(f"cannot read {path}: {e.strerror or e} (check the file and its permissions)") from None
    if len(_checked) >= 64:
        _checked.clear()
    _checked[key] = header
    return header


class _Reader:
    """A bounds-checked cursor over the memory-mapped file."""

    def __init__(self, buf: mmap.mmap, size: int, path: Path) -> None:
        self.buf, self.size, self.path, self.pos = buf, size, path, 0
        self.tokens: list[bytes] = []
        self.kvs: dict[str, _KV] = {}

    # -- primitives -------------------------------------------------------------------------------

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise _Bad(
                f"{what} at byte {self.pos} needs {n} bytes but the file ends at byte {self.size}", FIX_TRUNCATED
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, what: str) -> bytes:
        n = self.u64(f"the length of {what}")
        if n > self.size - self.pos:
            raise _Bad(
                f"{what} at byte {self.pos - 8} has length {n}, past the end of the file ({self.size} bytes)",
                FIX_TRUNCATED,
            )
        s = self.buf[self.pos : self.pos + n]
        self.pos += n
        return s

    def value_type(self, what: str) -> int:
        t = self.u32(f"the type of {what}")
        if t not in _SCALARS and t not in (V.STRING, V.ARRAY):
            raise _Bad(f"{what} has value type {t}, which GGUF does not define (types are 0..12)")
        return t

    # -- the file ---------------------------------------------------------------------------------

    def read(self) -> GGUFHeader:
        magic = bytes(self.buf[:4])
        if magic != b"GGUF":
            raise _Bad(
                f"the file starts with {magic!r}, not b'GGUF'", "convert it with llama.cpp's convert_hf_to_gguf.py"
            )
        self.pos = 4
        version = self.u32("the version")
        if version not in (2, 3):
            if version in (0, 1):
                fix = "convert it again with a current llama.cpp"
            elif version & 0xFFFF == 0:
                fix = "a big-endian file? convert it again for a little-endian machine"
            else:
                fix = "a newer format or a damaged file: update llama-cpp-python, or download or convert it again"
            raise _Bad(f"GGUF version {version}; this llama.cpp reads versions 2 and 3", fix)
        n_tensors = self.u64("the tensor count")
        n_kv = self.u64("the key-value count")
        room = self.size - _HEADER
        if n_kv > room // _MIN_KV or n_tensors > room // _MIN_TENSOR or n_kv * _MIN_KV + n_tensors * _MIN_TENSOR > room:
            raise _Bad(
                f"the header counts {n_tensors} tensors and {n_kv} key-value pairs, more than a file of "
                f"{self.size} bytes can hold",
                FIX_TRUNCATED,
            )
        kvs: dict[str, _KV] = {}
        for i in range(n_kv):
            raw_key = self.string(f"key {i}")
            key = raw_key.decode("utf-8", errors="replace")
            if not raw_key:
                raise _Bad(f"key {i} is empty")
            if key in kvs:
                raise _Bad(f"key {_show(key)} appears twice")
            kvs[key] = self.kv_value(key)
        alignment = 32
        if "general.alignment" in kvs:
            kv = kvs["general.alignment"]
            if kv.vtype != V.UINT32:
                raise _Bad(f"general.alignment has type {V(kv.vtype).name}; llama.cpp reads it only as UINT32")
            alignment = kv.value
            if alignment <= 0 or alignment & (alignment - 1):
                raise _Bad(f"general.alignment is {alignment}, not a power of two")
        header = GGUFHeader(self.path, version, alignment, 0)
        for key, kv in kvs.items():
            if kv.vtype == V.ARRAY:
                header.arrays[key] = (kv.item_type, kv.count)
            else:
                header.metadata[key] = kv.value.decode("utf-8", errors="replace") if kv.vtype == V.STRING else kv.value
        self.kvs = kvs
        self.read_tensors(header, n_tensors)
        return header

    def kv_value(self, key: str) -> _KV:
        what = f"the value of {_show(key)}"
        t = self.value_type(what)
        if t == V.STRING:
            return _KV(t, self.string(what))
        if t != V.ARRAY:
            fmt = _SCALARS[t]
            self.need(fmt.size, what)
            (v,) = fmt.unpack_from(self.buf, self.pos)
            self.pos += fmt.size
            return _KV(t, bool(v) if t == V.BOOL else v)
        item_type = self.value_type(f"the items of {_show(key)}")
        count = self.u64(f"the length of {_show(key)}")
        start = self.pos
        self.skip_array(key, item_type, count, depth=0, keep=key == "tokenizer.ggml.tokens")
        if item_type == V.ARRAY:
            raise _Bad(f"{_show(key)} is an array of arrays, which llama.cpp cannot read")
        return _KV(t, None, item_type, count, start)

    def skip_array(self, key: str, item_type: int, count: int, depth: int, keep: bool = False) -> None:
        """Step over ``count`` items of ``item_type``, checking every length against the file."""
        room = self.size - self.pos
        item_min = {V.STRING: 8, V.ARRAY: 12}.get(item_type) or _SCALARS[item_type].size
        if count > room // item_min:
            raise _Bad(f"{_show(key)} claims {count} items but only {room} bytes of the file remain", FIX_TRUNCATED)
        if item_type in _SCALARS:
            self.pos += count * item_min
        elif item_type == V.STRING:
            self.skip_strings(key, count, keep)
        else:
            if depth >= 8:
                raise _Bad(f"{_show(key)} nests arrays more than 8 deep")
            for _ in range(count):
                inner = self.value_type(f"an item of {_show(key)}")
                self.skip_array(key, inner, self.u64(f"the length of an item of {_show(key)}"), depth + 1)

    def skip_strings(self, key: str, count: int, keep: bool) -> None:
        buf, pos, end = self.buf, self.pos, self.size
        unpack = _U64.unpack_from
        kept: list[bytes] = []
        append = kept.append
        for i in range(count):
            if pos + 8 > end:
                self.pos = pos
                raise _Bad(f"string {i} of {_show(key)} at byte {pos} runs past the end of the file", FIX_TRUNCATED)
            (n,) = unpack(buf, pos)
            pos += 8
            if n > end - pos:
                raise _Bad(
                    f"string {i} of {_show(key)} at byte {pos - 8} has length {n}, past the end of the file "
                    f"({end} bytes)",
                    FIX_TRUNCATED,
                )
            if keep:
                append(buf[pos : pos + n])
            pos += n
        self.pos = pos
        if keep:
            self.tokens = kept

    def read_tensors(self, header: GGUFHeader, n_tensors: int) -> None:
        names: set[str] = set()
        for i in range(n_tensors):
            raw = self.string(f"the name of tensor {i}")
            name = raw.decode("utf-8", errors="replace")
            if not raw or len(raw) >= MAX_NAME:
                raise _Bad(
                    f"tensor {i} has a name of {len(raw)} bytes ({_show(name)}); llama.cpp allows 1..{MAX_NAME - 1}"
                )
            if name in names:
                raise _Bad(f"tensor {_show(name)} appears twice")
            names.add(name)
            what = f"tensor {_show(name)}"
            n_dims = self.u32(f"the dimension count of {what}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise _Bad(f"{what} has {n_dims} dimensions; llama.cpp allows 1..{MAX_DIMS}")
            dims = []
            for d in range(n_dims):
                self.need(8, f"dimension {d} of {what}")
                (n,) = _I64.unpack_from(self.buf, self.pos)
                self.pos += 8
                if n < 1:
                    raise _Bad(f"{what} has dimension {d} of {n} elements; every dimension needs at least 1")
                dims.append(n)
            n_elements = math.prod(dims)
            if n_elements >= 2**63:
                raise _Bad(f"{what} has shape {dims}: {n_elements} elements overflow a 64-bit count")
            t = self.u32(f"the type of {what}")
            try:
                qtype = Q(t)
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise _Bad(f"{what} has ggml type {t}, which this llama.cpp does not know") from None
            if dims[0] % block:
                raise _Bad(
                    f"{what} of type {qtype.name} has rows of {dims[0]} elements, not a multiple of its block "
                    f"size {block}"
                )
            offset = self.u64(f"the data offset of {what}")
            if offset % header.alignment:
                raise _Bad(f"{what} starts at data offset {offset}, not a multiple of the alignment {header.alignment}")
            header.tensors.append(TensorInfo(name, tuple(dims), t, offset, n_elements // block * type_size))
        data = self.pos + (-self.pos % header.alignment if n_tensors else 0)
        header.data_offset = data
        end_prev, prev = 0, ""
        for t in sorted(header.tensors, key=lambda t: t.offset):
            end = data + t.offset + t.nbytes
            if end > self.size:
                raise _Bad(
                    f"the data of tensor {_show(t.name)} ({t.nbytes} bytes at data offset {t.offset}) ends at byte "
                    f"{end}, past the end of the file ({self.size} bytes)",
                    FIX_TRUNCATED,
                )
            if t.offset < end_prev:
                raise _Bad(f"tensors {_show(prev)} and {_show(t.name)} overlap in the data section")
            end_prev, prev = t.offset + t.nbytes, t.name

    # -- values the model checks need -------------------------------------------------------------

    def array(self, key: str) -> np.ndarray:
        """The items of a numeric array, copied out of the map."""
        kv = self.kvs[key]
        dtype = np.dtype(_NUMPY[kv.item_type])
        return np.frombuffer(self.buf[kv.start : kv.start + kv.count * dtype.itemsize], dtype=dtype)


# -- the model: hyper-parameters, tensors and vocabulary -------------------------------------------


def _check_model(h: GGUFHeader, r: _Reader) -> None:
    kvs = r.kvs
    arch_kv = kvs.get("general.architecture")
    if arch_kv is None:
        raise _Bad("general.architecture is missing")
    if arch_kv.vtype != V.STRING:
        raise _Bad(f"general.architecture has type {V(arch_kv.vtype).name}, not a string")
    arch = h.architecture
    if not arch:
        raise _Bad("general.architecture is empty")
    if not arch.isprintable() or len(arch) > 64:
        raise _Bad(f"general.architecture is {_show(arch)}, not an architecture name")
    _check_floats(r, arch)

    def ints(key: str, n: int | None = None) -> list[int] | None:
        """An integer hyper-parameter, as one value or one per layer (``n`` of them)."""
        kv = kvs.get(key)
        if kv is None:
            return None
        if kv.vtype in _INTS:
            return [kv.value] * (n or 1)
        if kv.vtype == V.ARRAY and kv.item_type in _INTS:
            if n is not None and kv.count != n:
                raise _Bad(f"{key} has {kv.count} entries but {arch}.block_count is {n} (one per layer)")
            return [int(v) for v in r.array(key)]
        raise _Bad(f"{key} has type {_type_name(kv)}, not an integer")

    blocks = ints(f"{arch}.block_count")
    if blocks is None:
        raise _Bad(f"{arch}.block_count is missing (general.architecture is {_show(arch)})")
    if kvs[f"{arch}.block_count"].vtype == V.ARRAY:
        raise _Bad(f"{arch}.block_count is an array, not one integer")
    n_layer = blocks[0]
    if not 1 <= n_layer <= MAX_LAYERS:
        raise _Bad(f"{arch}.block_count is {n_layer}; llama.cpp needs 1..{MAX_LAYERS} layers")

    def positive(key: str) -> int | None:
        v = ints(key)
        if v is not None and v[0] < 1:
            raise _Bad(f"{key} is {v[0]}; it must be at least 1")
        return v[0] if v else None

    n_embd = positive(f"{arch}.embedding_length")
    positive(f"{arch}.context_length")
    ints(f"{arch}.feed_forward_length", n_layer)
    key_length = positive(f"{arch}.attention.key_length")
    heads = ints(f"{arch}.attention.head_count", n_layer)
    heads_kv = ints(f"{arch}.attention.head_count_kv", n_layer)
    if heads is not None:
        heads_kv = heads_kv or heads
        for layer, (nh, nkv) in enumerate(zip(heads, heads_kv)):
            if nh < 0 or nkv < 0:
                raise _Bad(f"{arch}.attention.head_count{'_kv' if nkv < 0 else ''} is negative at layer {layer}")
            if nh and (nkv < 1 or nh % nkv):
                raise _Bad(
                    f"{arch}.attention.head_count_kv is {nkv} at layer {layer}, which does not divide "
                    f"{arch}.attention.head_count {nh}"
                )
        if n_embd and heads[0] and key_length is None and n_embd % heads[0]:
            raise _Bad(
                f"{arch}.attention.head_count {heads[0]} does not divide {arch}.embedding_length {n_embd} "
                f"(and {arch}.attention.key_length is not given)"
            )
    head_dim = key_length or (n_embd // heads[0] if n_embd and heads and heads[0] else None)
    rot = ints(f"{arch}.rope.dimension_count")
    if rot is not None and (rot[0] < 0 or rot[0] % 2 or (head_dim and rot[0] > head_dim)):
        raise _Bad(f"{arch}.rope.dimension_count is {rot[0]}; it must be even and at most the head size {head_dim}")
    experts = ints(f"{arch}.expert_count")
    used = ints(f"{arch}.expert_used_count")
    n_expert = experts[0] if experts else 0
    n_used = max(used) if used else 0
    if n_expert < 0 or n_used < 0 or n_used > n_expert or (n_expert > 0 and n_used < 1):
        raise _Bad(
            f"{arch}.expert_used_count is {n_used} and {arch}.expert_count is {n_expert}; a mixture of experts "
            "needs 1..expert_count experts per token, a dense model neither key"
        )

    for t in h.tensors:
        m = _LAYER.match(t.name)
        if m and int(m.group(1)) >= n_layer:
            raise _Bad(f"tensor {_show(t.name)} belongs to layer {m.group(1)} but {arch}.block_count is {n_layer}")
        qtype = Q(t.ggml_type)
        if qtype in _NOT_FOR_WEIGHTS:
            raise _Bad(f"tensor {_show(t.name)} has type {qtype.name}, which llama.cpp cannot compute with")
        if qtype != Q.F32 and (len(t.dims) == 1 or t.name.endswith("_norm.weight")):
            raise _Bad(
                f"tensor {_show(t.name)} has type {qtype.name}; llama.cpp computes norms and 1-D tensors only in F32"
            )

    _check_vocabulary(h, r, n_embd)


def _type_name(kv: _KV) -> str:
    if kv.vtype == V.ARRAY:
        return f"ARRAY of {V(kv.item_type).name}"
    return V(kv.vtype).name


# (key suffix, lower bound, bound included): RoPE and norm values llama.cpp uses as they are. A zero
# scale means "not set" to llama.cpp; a zero or negative base, epsilon or attention factor does not.
_FLOAT_RULES = (
    (".rope.freq_base", 0.0, False),
    (".rope.freq_base_swa", 0.0, False),
    (".rope.freq_scale", 0.0, False),
    (".rope.scale_linear", 0.0, True),
    (".rope.scaling.factor", 0.0, True),
    (".rope.scaling.attn_factor", 0.0, False),
    ("epsilon", 0.0, False),
)


def _check_floats(r: _Reader, arch: str) -> None:
    """Architecture floats: NaN nowhere, and the RoPE and norm values finite and in range."""
    prefix = arch + "."
    for key, kv in r.kvs.items():
        if not key.startswith(prefix):
            continue
        if kv.vtype in _FLOATS:
            values = [kv.value]
        elif kv.vtype == V.ARRAY and kv.item_type in _FLOATS and kv.count <= 4096:
            values = r.array(key).tolist()
        else:
            continue
        for v in values:
            if math.isnan(v):
                raise _Bad(f"{key} is nan")
            for suffix, low, inclusive in _FLOAT_RULES:
                if key.endswith(suffix) and (not math.isfinite(v) or v < low or (v == low and not inclusive)):
                    bound = f">= {low:g}" if inclusive else f"> {low:g}"
                    raise _Bad(f"{key} is {_show(v)}; it must be finite and {bound}")


def _check_vocabulary(h: GGUFHeader, r: _Reader, n_embd: int | None) -> None:
    kvs = r.kvs
    model_kv = kvs.get("tokenizer.ggml.model")
    if model_kv is None:
        raise _Bad("tokenizer.ggml.model is missing: the file has no tokenizer, and trimix needs one")
    if model_kv.vtype != V.STRING:
        raise _Bad(f"tokenizer.ggml.model has type {_type_name(model_kv)}, not a string")
    model = model_kv.value.decode("utf-8", errors="replace")
    if model in ("none", "no_vocab"):
        raise _Bad(
            f"tokenizer.ggml.model is {model!r}: the file has no vocabulary, and trimix needs one",
            "use a GGUF file of the model that includes its tokenizer",
        )
    tokens_kv = kvs.get("tokenizer.ggml.tokens")
    if tokens_kv is None:
        raise _Bad("tokenizer.ggml.tokens is missing")
    if tokens_kv.vtype != V.ARRAY or tokens_kv.item_type != V.STRING:
        raise _Bad(f"tokenizer.ggml.tokens has type {_type_name(tokens_kv)}, not an array of strings")
    n_vocab = tokens_kv.count
    if n_vocab == 0:
        raise _Bad("tokenizer.ggml.tokens is empty")
    for key, kinds in (("tokenizer.ggml.scores", _FLOATS), ("tokenizer.ggml.token_type", _INTS)):
        kv = kvs.get(key)
        if kv is None:
            continue
        if kv.vtype != V.ARRAY or kv.item_type not in kinds:
            raise _Bad(
                f"{key} has type {_type_name(kv)}, not an array of {'floats' if kinds is _FLOATS else 'integers'}"
            )
        if kv.count != n_vocab:
            raise _Bad(f"{key} has {kv.count} entries but tokenizer.ggml.tokens has {n_vocab}")

    tokens = r.tokens
    token_set = set(tokens)
    if len(token_set) != n_vocab:
        seen: dict[bytes, int] = {}
        for i, tok in enumerate(tokens):
            if tok in seen:
                raise _Bad(
                    f"tokens {seen[tok]} and {i} of tokenizer.ggml.tokens are both {_show(tok)}; llama.cpp aborts "
                    "on a vocabulary with two tokens of the same text"
                )
            seen[tok] = i
    if model == "llama" and not _BYTE_TOKENS.issubset(token_set):
        missing = sorted(_BYTE_TOKENS.difference(token_set))
        raise _Bad(
            f"the SentencePiece vocabulary lacks the byte token {missing[0].decode()} ({len(missing)} of the 256 "
            "are missing); llama.cpp aborts on the first character outside such a vocabulary",
            "reconvert the model with its byte-fallback tokens",
        )
    if model == "bert" and "tokenizer.ggml.token_type" in kvs:
        types = r.array("tokenizer.ggml.token_type")
        byte_ids = np.flatnonzero(types == TOKEN_TYPE_BYTE)
        if len(byte_ids):
            raise _Bad(
                f"token {int(byte_ids[0])} of the WordPiece vocabulary has type BYTE (6), on which llama.cpp aborts"
            )
    for key, kv in kvs.items():
        if not (key.startswith("tokenizer.ggml.") and key.endswith("_token_id")):
            continue
        if kv.vtype not in _INTS:
            raise _Bad(f"{key} has type {_type_name(kv)}, not an integer")
        if kv.value not in NO_TOKEN and not 0 <= kv.value < n_vocab:
            raise _Bad(f"{key} is {kv.value}, outside the vocabulary of {n_vocab} tokens")

    embd = next((t for t in h.tensors if t.name == "token_embd.weight"), None)
    if embd is not None and len(embd.dims) == 2:
        if n_embd is not None and embd.dims[0] != n_embd:
            raise _Bad(
                f"tensor token_embd.weight has rows of {embd.dims[0]} values but {h.architecture}.embedding_length "
                f"is {n_embd}"
            )
        if embd.dims[1] != n_vocab:
            raise _Bad(
                f"tensor token_embd.weight has {embd.dims[1]} rows but tokenizer.ggml.tokens has {n_vocab} tokens; "
                "llama.cpp needs one row per token"
            )
