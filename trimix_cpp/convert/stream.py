"""A checkpoint streamed into a GGUF file, one slab of rows at a time.

The order of work is what keeps this safe and small:

1. Read and check everything that can be wrong without reading weights: config.json, every shard
   header, every tensor's name and shape against the config, the tokenizer. Nothing is written yet.
2. Plan the file: the metadata, then each tensor's name, shape and output type, so the exact size
   of the file is known before its first byte; check the disk has room for it.
3. Write the header, the metadata and the tensor table with ``gguf.GGUFWriter``, then the tensor
   data straight to its file handle, slab by slab: a slab is a few MiB of rows, read, transformed
   (llama's Q/K permutation, Gemma's ``1 + w``), checked for NaN, encoded (by a few threads, since
   numpy releases the GIL) and written in order. Peak memory is a few slabs, not a tensor and never
   the model.
4. Check the file has exactly the planned size and rename it into place. Any failure or Ctrl-C on
   the way removes the partial file.
"""

from __future__ import annotations

import math
import struct
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

import gguf
import numpy as np
from gguf.gguf_writer import WriterState

from ..errors import TrimixError
from .architectures import Family, TensorPlan, family_for
from .checkpoint import Checkpoint, CheckpointError, SourceTensor, bf16_to_f16, to_float32
from .outfile import check_room, gib, partial_beside, publish
from .qtypes import DIRECT_TYPES, FTYPES, T

__all__ = ["Progress", "convert_direct", "plan_conversion"]

Progress = Callable[[str, int, int], None]

# float32 bytes of rows converted at once; the slabs in flight (threads + 2) make the working memory
SLAB_BYTES = 4 * 2**20


class ConversionPlan:
    """Everything decided before writing: the writer with its metadata, and each tensor's plan."""

    def __init__(self, ckpt: Checkpoint, fam: Family, writer: gguf.GGUFWriter, tensors: list[TensorPlan]) -> None:
        self.ckpt = ckpt
        self.family = fam
        self.writer = writer
        self.tensors = tensors
        self._kv: bytes | None = None

    @property
    def data_bytes(self) -> int:
        return sum(gguf.GGUFWriter.ggml_pad(t.nbytes, self.writer.data_alignment) for t in self.tensors)

    def kv_bytes(self) -> bytes:
        """The metadata section, serialized once (the tokenizer makes it a few MB for a large vocabulary)."""
        if self._kv is None:
            self._kv = pack_kv(self.writer.kv_data[0])
        return self._kv

    def file_bytes(self) -> int:
        """The exact size of the GGUF file this plan writes."""
        w = self.writer
        meta = 4 + 4 + 8 + 8 + len(self.kv_bytes())
        meta += sum(8 + len(name.encode()) + 4 + 8 * len(ti.shape) + 4 + 8 for name, ti in w.tensors[0].items())
        return gguf.GGUFWriter.ggml_pad(meta, w.data_alignment) + self.data_bytes

    @property
    def n_weights(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors)


def plan_conversion(checkpoint_dir: Path, out_type: str) -> ConversionPlan:
    """Read and check the checkpoint and its tokenizer; plan every key and tensor of the output."""
    ckpt = Checkpoint(checkpoint_dir)
    fam = family_for(ckpt.config)
    tensors = fam.plan_tensors(list(ckpt.tensors))
    for plan in tensors:
        if plan.source:
            src = ckpt.tensors[plan.source]
            if src.shape != plan.shape:
                raise CheckpointError(
                    f"tensor {plan.source} has shape {list(src.shape)} but config.json implies {list(plan.shape)} "
                    "(the weights and config.json do not belong together)"
                )

    writer = gguf.GGUFWriter(None, fam.arch)
    _write_general(writer, ckpt, fam, sum(math.prod(t.shape) for t in tensors))
    writer.add_file_type(FTYPES[out_type])
    if out_type == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    from .tokenizer import write_tokenizer  # the tokenizer's own module: byte-level BPE and SentencePiece

    # Qwen and Llama pad the tokenizer with unused ids up to the embedding's rows; Gemma 3's embedding
    # has rows beyond its tokenizer that llama.cpp's converters cut off, and so does this one.
    write_tokenizer(writer, ckpt.dir, fam.arch, n_vocab=None if fam.gemma else fam.n_vocab)
    tokens = writer.kv_data[0][gguf.Keys.Tokenizer.LIST].value
    n_tokens = len(tokens)
    if n_tokens > fam.n_vocab:
        raise CheckpointError(
            f"the tokenizer has {n_tokens} tokens but the embedding has {fam.n_vocab} rows "
            "(the tokenizer files belong to another model)"
        )
    if n_tokens < fam.n_vocab:
        for plan in tensors:
            if plan.name in ("token_embd.weight", "output.weight"):
                plan.shape = (n_tokens, *plan.shape[1:])
        fam.n_vocab = n_tokens
    fam.write_hparams(writer)

    qtype = DIRECT_TYPES[out_type]
    for plan in tensors:
        plan.qtype = T.F32 if plan.keeps_f32 else qtype
        row = plan.shape[-1]
        if plan.qtype == T.Q8_0 and row % gguf.GGML_QUANT_SIZES[T.Q8_0][0]:
            plan.qtype = T.F16  # rows that do not tile into q8_0 blocks, as llama.cpp's converter does
        plan.nbytes = _encoded_bytes(plan.shape, plan.qtype)
        writer.add_tensor_info(plan.name, plan.shape, np.dtype(np.float32), plan.nbytes, raw_dtype=plan.qtype)
    return ConversionPlan(ckpt, fam, writer, tensors)


def _encoded_bytes(shape: tuple[int, ...], qtype: T) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def _write_general(writer: gguf.GGUFWriter, ckpt: Checkpoint, fam: Family, n_params: int) -> None:
    """``general.*`` provenance: name, base model, license and the rest the model card declares."""
    try:
        meta = gguf.Metadata.load(None, ckpt.dir, None, n_params)
    except Exception:  # a model card the heuristics cannot read is no reason to refuse the weights
        meta = gguf.Metadata()
    meta.name = meta.name or ckpt.dir.resolve().name
    meta.set_gguf_meta_model(writer)
    writer.add_string("general.source.hf_architecture", fam.hf_arch)


# GGUF scalar types -> struct format and numpy dtype (little-endian, as GGUFWriter writes by default)
_V = gguf.GGUFValueType
_SCALAR: dict[int, tuple[str, str]] = {
    _V.UINT8: ("<B", "<u1"),
    _V.INT8: ("<b", "<i1"),
    _V.UINT16: ("<H", "<u2"),
    _V.INT16: ("<h", "<i2"),
    _V.UINT32: ("<I", "<u4"),
    _V.INT32: ("<i", "<i4"),
    _V.FLOAT32: ("<f", "<f4"),
    _V.UINT64: ("<Q", "<u8"),
    _V.INT64: ("<q", "<i8"),
    _V.FLOAT64: ("<d", "<f8"),
    _V.BOOL: ("?", "u1"),
}


def pack_kv(kv_data: dict[str, Any]) -> bytes:
    """The metadata key-value section exactly as ``GGUFWriter.write_kv_data_to_file`` writes it, but
    packing arrays whole: its per-item packing takes seconds for a 150,000-token vocabulary."""
    out = bytearray()
    for key, v in kv_data.items():
        kb = key.encode("utf-8")
        out += struct.pack("<Q", len(kb)) + kb
        out += _pack_value(v.value, v.type, v.sub_type)
    return bytes(out)


def _pack_value(val: Any, vtype: int, sub_type: int | None) -> bytes:
    head = struct.pack("<I", vtype)
    if vtype in _SCALAR:
        return head + struct.pack(_SCALAR[vtype][0], val)
    if vtype == _V.STRING:
        b = val.encode("utf-8") if isinstance(val, str) else bytes(val)
        return head + struct.pack("<Q", len(b)) + b
    if vtype != _V.ARRAY or len(val) == 0:
        raise TrimixError(f"cannot write metadata of type {vtype} (report this)")
    if sub_type is not None:
        item = sub_type
    elif isinstance(val, bytes | bytearray):
        item = _V.UINT8
    else:
        item = _V.get_type(val[0])
    head += struct.pack("<IQ", item, len(val))
    if item == _V.STRING:
        enc = [s.encode("utf-8") if isinstance(s, str) else bytes(s) for s in val]
        return head + b"".join(struct.pack("<Q", len(e)) + e for e in enc)
    if item in _SCALAR:
        return head + np.asarray(val, dtype=np.dtype(_SCALAR[item][1])).tobytes()
    return head + b"".join(_pack_value(x, item, None)[4:] for x in val)  # nested arrays: item by item


# -- writing -----------------------------------------------------------------------------------------


def convert_direct(
    plan: ConversionPlan,
    out_path: Path,
    *,
    progress: Progress | None = None,
    room_extra: int = 0,
    workers: int = 1,
) -> Path:
    """Write ``plan`` to ``out_path`` (beside, then renamed) with ``workers`` converting threads;
    ``room_extra`` is further disk space a following step will need in the same folder, checked now
    so that step cannot fail half-way."""
    size = plan.file_bytes()
    check_room(
        out_path.parent, size + room_extra, f"the {gib(size)} GGUF" + (" and its quantized copy" if room_extra else "")
    )
    partial = partial_beside(out_path)
    try:
        _write(plan, partial, progress, max(1, workers))
        written = partial.stat().st_size
        if written != size:
            raise TrimixError(f"wrote {written:,} bytes to {partial} but planned {size:,} (report this)")
        return publish(partial, out_path)
    finally:
        partial.unlink(missing_ok=True)


def _write(plan: ConversionPlan, path: Path, progress: Progress | None, workers: int) -> None:
    """Header, metadata and tensor table through GGUFWriter, then the tensor data slab by slab.

    Slabs are read in file order, converted by ``workers`` threads (numpy's casts, sums and the
    quantizer release the GIL) and written in order; at most ``workers + 2`` slabs are in flight, so
    memory stays a few slabs whatever the model.
    """
    w = plan.writer
    jobs = [(t, plan.ckpt.tensors.get(t.source), r0, r1) for t in plan.tensors for r0, r1 in _slabs(t, plan.ckpt)]
    total = sum(_slab_source_bytes(t, src, r0, r1) for t, src, r0, r1 in jobs if src is not None)
    handles = plan.ckpt.open_files()
    read_lock = threading.Lock()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="convert")
    try:
        w.write_header_to_file(path)
        assert w.fout is not None
        w.fout[0].write(plan.kv_bytes())
        w.state = WriterState.KV_DATA  # the metadata went in whole (see pack_kv); the writer resumes here
        w.write_ti_data_to_file()
        fout = w.fout[0]
        w.write_padding(fout, fout.tell())
        if progress:
            progress("convert", 0, total)
        done = 0
        start = fout.tell()
        pending: deque[tuple[tuple[Any, ...], Future[np.ndarray]]] = deque()

        def finish_one() -> None:
            nonlocal done, start
            (t, src, r0, r1), fut = pending.popleft()
            data = fut.result()
            if r0 == 0:
                start = fout.tell()
            fout.write(memoryview(data).cast("B"))
            if src is not None:
                done += _slab_source_bytes(t, src, r0, r1)
                if progress:
                    progress("convert", done, total)
            if r1 == _n_rows(t):  # the tensor's last slab
                if fout.tell() - start != t.nbytes:
                    raise TrimixError(
                        f"tensor {t.name} took {fout.tell() - start} bytes, planned {t.nbytes} (report this)"
                    )
                w.write_padding(fout, t.nbytes)

        for job in jobs:
            t, src, r0, r1 = job
            handle = handles[src.path] if src is not None else None
            pending.append((job, pool.submit(_convert_slab, t, src, handle, read_lock, r0, r1)))
            if len(pending) >= workers + 2:
                finish_one()
        while pending:
            finish_one()
        fout.flush()
    except OSError as e:
        raise TrimixError(f"writing {path} failed: {e.strerror or e} (is the disk full?)") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        w.close()
        for h in handles.values():
            h.close()


def _n_rows(t: TensorPlan) -> int:
    return t.shape[0] if len(t.shape) > 1 else 1


def _slabs(t: TensorPlan, ckpt: Checkpoint) -> list[tuple[int, int]]:
    """Row ranges of one tensor, each about SLAB_BYTES of float32, cut at head boundaries when permuted."""
    rows = _n_rows(t)
    if t.computed is not None:
        return [(0, rows)]
    row_elems = ckpt.tensors[t.source].row_elems
    align = t.head_dim or 1
    per = max(align, SLAB_BYTES // 4 // max(row_elems, 1) // align * align)
    return [(r0, min(rows, r0 + per)) for r0 in range(0, rows, per)]


def _slab_source_bytes(t: TensorPlan, src: SourceTensor, r0: int, r1: int) -> int:
    return (r1 - r0) * src.row_elems * (src.nbytes // max(math.prod(src.shape), 1))


def _convert_slab(
    t: TensorPlan, src: SourceTensor | None, handle: Any, read_lock: threading.Lock, r0: int, r1: int
) -> np.ndarray:
    """Rows ``[r0, r1)`` of one tensor: read, transformed, checked and encoded for the output."""
    if t.computed is not None:
        return np.ascontiguousarray(_encode(t.computed, t.qtype))
    assert src is not None
    if src.dtype == "BF16" and t.qtype == T.F16 and not t.add_one:
        return _bf16_slab_to_f16(t, src, handle, read_lock, r0, r1)
    # Every encoding but f32 makes a new array, so the read and the float32 rows can live in this thread's
    # scratch buffers (reused slab after slab); f32 output may be those very rows, so it gets its own.
    scratch = t.qtype != T.F32
    n = (r1 - r0) * src.row_elems
    with read_lock:  # one handle per shard, read in turn; the work after the read runs in parallel
        raw = src.read_raw(handle, r0, r1, _scratch("raw", n * 4) if scratch else None)
    x = to_float32(raw, _scratch("f32", n * 4).view(np.float32) if scratch else None)
    row_elems = src.row_elems
    if t.head_dim:
        k = (r1 - r0) // t.head_dim
        x = x.reshape(k, 2, t.head_dim // 2, row_elems).swapaxes(1, 2).reshape(r1 - r0, row_elems)
    if t.add_one:
        x = x + np.float32(1.0)
    if t.qtype != T.F16 and not _all_finite(x):  # f16 is checked after encoding, which also catches overflow
        _not_finite(t, r0, r1)
    data = _encode(x if len(t.shape) > 1 else x.reshape(-1), t.qtype)
    if t.qtype == T.F16 and not math.isfinite(float(data.sum(dtype=np.float32))):  # f16 sums cannot overflow it
        if _all_finite(x):
            raise CheckpointError(
                "tensor {tensor} has values beyond f16's range (±65504); convert with {out_type} bf16 or f32",
                param="out_type",
                tensor=t.source,
            )
        _not_finite(t, r0, r1)
    return np.ascontiguousarray(data)


_SCRATCH = threading.local()


def _scratch(name: str, nbytes: int) -> np.ndarray:
    """This thread's reusable byte buffer ``name``, at least ``nbytes`` long: slab after slab, the read and
    the float32 rows land in memory already mapped instead of fresh allocations that fault every page in."""
    buf: np.ndarray | None = getattr(_SCRATCH, name, None)
    if buf is None or buf.nbytes < nbytes:
        buf = np.empty(nbytes, np.uint8)
        setattr(_SCRATCH, name, buf)
    return buf[:nbytes]


def _all_finite(x: np.ndarray) -> bool:
    """Whether no value is NaN or infinite. A float32 sum (one vectorized pass, no temporary) is finite when
    every value is, since NaN and infinity propagate through it; only a sum that is not (which large finite
    values can also cause by overflowing it) is settled exactly, element by element."""
    with np.errstate(over="ignore", invalid="ignore"):
        if math.isfinite(float(x.sum(dtype=np.float32))):
            return True
    return bool(np.isfinite(x).all())


def _not_finite(t: TensorPlan, r0: int, r1: int) -> NoReturn:
    raise CheckpointError(
        f"tensor {t.source} has NaN or infinite values (rows {r0}-{r1 - 1}); the checkpoint is damaged "
        "or was saved mid-divergence: download it again or use another checkpoint"
    )


def _bf16_slab_to_f16(
    t: TensorPlan, src: SourceTensor, handle: Any, read_lock: threading.Lock, r0: int, r1: int
) -> np.ndarray:
    """The common case (a BF16 checkpoint to f16) on the stored bits, without a float32 copy."""
    with read_lock:
        bits = src.read_raw(handle, r0, r1)
    if t.head_dim:
        k = (r1 - r0) // t.head_dim
        bits = bits.reshape(k, 2, t.head_dim // 2, -1).swapaxes(1, 2).reshape(r1 - r0, -1)
    data = np.ascontiguousarray(bf16_to_f16(bits if len(t.shape) > 1 else bits.reshape(-1)))
    if not math.isfinite(float(data.sum(dtype=np.float32))):  # float16 sums cannot overflow float32
        stored = ((bits.astype(np.uint32) << 16).view(np.float32)).sum(dtype=np.float64)
        if math.isfinite(float(stored)):
            raise CheckpointError(
                "tensor {tensor} has values beyond f16's range (±65504); convert with {out_type} bf16 or f32",
                param="out_type",
                tensor=t.source,
            )
        raise CheckpointError(
            f"tensor {t.source} has NaN or infinite values (rows {r0}-{r1 - 1}); the checkpoint is damaged "
            "or was saved mid-divergence: download it again or use another checkpoint"
        )
    return data


def _encode(x: np.ndarray, qtype: T) -> np.ndarray:
    if qtype == T.F32:
        return x.astype(np.float32, copy=False)
    if qtype == T.F16:
        with np.errstate(over="ignore"):  # out-of-range values become inf, which the caller reports
            return x.astype(np.float16)
    if qtype == T.Q8_0 and _fast_q8_0():
        from .._llama import quantize_q8_0

        return quantize_q8_0(x.reshape(-1, x.shape[-1]))
    return gguf.quants.quantize(np.ascontiguousarray(x, dtype=np.float32), qtype)


# q8_0 through ggml's own row quantizer (trimix_cpp._llama): the bytes of the gguf package's numpy encoder,
# which it falls back to where this llama-cpp-python does not export the quantizer, but faster and on
# whole slabs. None until first needed (converting to other types never loads llama.cpp).
_FAST_Q8_0: bool | None = None


def _fast_q8_0() -> bool:
    global _FAST_Q8_0
    if _FAST_Q8_0 is None:
        from .._llama import q8_0_available

        _FAST_Q8_0 = q8_0_available()
    return _FAST_Q8_0
