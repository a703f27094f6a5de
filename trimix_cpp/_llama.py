"""The thin ctypes layer over llama.cpp: the only module that calls ``llama_cpp`` directly.

Why not the high-level ``llama_cpp.Llama`` class: it keeps a float32 ``scores`` array of
(n_batch or n_ctx) x n_vocab per model, which with a 262,144-token vocabulary is half a gigabyte
per model before anything runs, and it copies logits out of llama.cpp on every step. Fusion needs
neither: it reads each model's logits where llama.cpp left them, as zero-copy numpy views, and asks
llama.cpp for logits only at the positions that need them.

Everything here is deliberately small: load a model and a context that holds several sequences,
tokenize, decode a batch whose tokens each carry a position, a sequence and an output flag, view
logits, share and drop KV cells of a sequence, free. Policy (what to decode, how to fuse) lives in
the modules above this one.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import llama_cpp as _lc
import numpy as np

from .errors import ContextOverflowError, ModelFileError, TrimixError

__all__ = ["KVCacheFullError", "LlamaModel", "gpu_offload_supported", "quantize_model", "set_verbose", "system_info"]

_GGUF_MAGIC = b"GGUF"
# ggml's thread pool holds at most this many threads (GGML_MAX_N_THREADS); far more crashes it.
MAX_THREADS = 512
# Positions llama.cpp can address in one context; larger requests only fail later, less clearly.
MAX_N_CTX = 1 << 24
# The smallest context that can generate: one prompt token and one new token. (Measured: a context
# whose KV cache has fewer cells than it has sequences aborts inside llama.cpp when it is created,
# GGML_ASSERT(n_outputs_max <= cparams.n_outputs_max), since its batch is clamped to the cells; an
# engine keeps one scoring sequence besides --parallel ones, so --n-ctx 1 made 1 cell for 2 sequences.)
MIN_N_CTX = 2
# llama.cpp's LLAMA_MAX_SEQ: sequences one context can hold.
MAX_SEQ = 256
_backend_ready = False
_verbose = False


@_lc.llama_log_callback
def _log_quiet(level: int, text: bytes, user_data: Any) -> None:  # pragma: no cover - C callback
    """Swallow llama.cpp's log unless the user asked for it with --verbose."""
    if _verbose and text:
        sys.stderr.write(text.decode("utf-8", errors="replace"))


def set_verbose(verbose: bool) -> None:
    """Route llama.cpp's own log to stderr (verbose) or drop it (the default)."""
    global _verbose
    _verbose = verbose
    _lc.llama_log_set(_log_quiet, ctypes.c_void_p(0))


def is_verbose() -> bool:
    """Whether llama.cpp's log goes to stderr (``--verbose``)."""
    return _verbose


def _ensure_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        set_verbose(_verbose)
        _lc.llama_backend_init()
        _backend_ready = True


def gpu_offload_supported() -> bool:
    """True when this llama.cpp build has a GPU backend (CUDA, Metal, ...)."""
    _ensure_backend()
    return bool(_lc.llama_supports_gpu_offload())


def system_info() -> str:
    """llama.cpp's own one-line description of the compute backends it was built with."""
    _ensure_backend()
    return _lc.llama_print_system_info().decode("utf-8", errors="replace").strip()


def default_threads() -> int:
    """Every core this process may run on, which is what llama.cpp is fastest with on a laptop."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def extra_buffers_usable() -> bool:
    """Whether llama.cpp may store weights in its CPU "extra" buffer types (AMX, repacked layouts).

    A build that compiled in Intel AMX (``AMX_INT8 = 1`` in :func:`system_info`, which a native build
    does on any CPU that reports AMX) dies with SIGILL in its first AMX matrix product on the
    llama.cpp of llama-cpp-python 0.3.36: a kernel runs tile instructions on a thread that never
    loaded a tile configuration (seen on a 2-core Xeon VM, where AMX itself works in a plain C
    program). The extra buffer types are then left off, which keeps weights in plain CPU buffers;
    ``TRIMIX_CPU_EXTRA_BUFFERS=1`` turns them back on for a llama.cpp where the bug is fixed, ``0``
    turns them off everywhere.
    """
    setting = os.environ.get("TRIMIX_CPU_EXTRA_BUFFERS", "").strip()
    if setting in ("0", "1"):
        return setting == "1"
    return "AMX_INT8 = 1" not in system_info()


def check_gguf_file(path: Path) -> None:
    """Fail with one clear line when ``path`` is missing or is not a GGUF file."""
    if not path.exists():
        raise ModelFileError(f"model file not found: {path} (check the path or set it in the profile)")
    if not path.is_file():
        raise ModelFileError(f"model path is not a file: {path} (give the path of a .gguf file)")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != _GGUF_MAGIC:
        raise ModelFileError(
            f"not a GGUF file: {path} (starts with {magic!r}; convert it with llama.cpp's convert_hf_to_gguf.py)"
        )
    # llama.cpp aborts the process on some values it trusts in the header: check them first.
    from .gguf_check import check_gguf

    check_gguf(path)


def check_load_numbers(*, n_ctx: int, n_batch: int, n_threads: int | None) -> None:
    """Refuse context, batch and thread counts that llama.cpp would crash on or misread."""
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or not MIN_N_CTX <= n_ctx <= MAX_N_CTX:
        raise TrimixError(
            "{n_ctx} must be a whole number from {lo} (a prompt token and a generated one) to {hi}, got {got!r}",
            param="n_ctx",
            lo=MIN_N_CTX,
            hi=MAX_N_CTX,
            got=n_ctx,
        )
    if isinstance(n_batch, bool) or not isinstance(n_batch, int) or not 1 <= n_batch <= MAX_N_CTX:
        raise TrimixError(f"n_batch must be a whole number from 1 to {MAX_N_CTX}, got {n_batch!r}")
    if n_threads is not None and (
        isinstance(n_threads, bool) or not isinstance(n_threads, int) or not 0 <= n_threads <= MAX_THREADS
    ):
        raise TrimixError(
            "{n_threads} must be from 0 (every core) to {hi}, got {got!r} (this machine has {cores} cores)",
            param="n_threads",
            hi=MAX_THREADS,
            got=n_threads,
            cores=default_threads(),
        )


# The quantizer's parameters this module sets; the struct must carry them in the loaded llama.cpp.
_QUANTIZE_FIELDS = ("nthread", "ftype", "allow_requantize", "quantize_output_tensor")
_LOG_ERROR = 3  # GGML_LOG_LEVEL_ERROR
# llama.cpp logs "[  12/ 291] blk.0.attn_q.weight - ..." as it starts on each tensor
_QUANT_LINE = re.compile(rb"^\[\s*(\d+)/\s*(\d+)\]")


def quantize_model(
    src: Path,
    dst: Path,
    ftype: int,
    *,
    n_threads: int,
    allow_requantize: bool = False,
    on_tensor: Any = None,
) -> None:
    """llama.cpp's own quantizer on ``src``, writing ``dst`` as llama_ftype ``ftype``.

    llama.cpp has no progress callback for quantization, but it logs a line as it starts each tensor;
    ``on_tensor(started, total)`` is called from those lines, so progress counts real tensors. The
    call blocks until llama.cpp is done and cannot be cancelled: callers that must stop it run it in
    a process of its own. Failure raises :class:`TrimixError` with llama.cpp's own reason.
    """
    _ensure_backend()
    have = {name for name, _ in _lc.llama_model_quantize_params._fields_}
    if missing := [f for f in _QUANTIZE_FIELDS if f not in have]:
        raise TrimixError(f"this llama-cpp-python lacks quantize parameters {missing}; upgrade llama-cpp-python")
    params = _lc.llama_model_quantize_default_params()
    params.nthread = n_threads
    params.ftype = ftype
    params.allow_requantize = allow_requantize
    params.quantize_output_tensor = True
    errors: list[str] = []

    @_lc.llama_log_callback
    def log(level: int, text: bytes, user_data: Any) -> None:  # pragma: no cover - C callback
        if not text:
            return
        if _verbose:
            sys.stderr.write(text.decode("utf-8", errors="replace"))
        if level == _LOG_ERROR:
            errors.append(text.decode("utf-8", errors="replace").strip())
        elif on_tensor is not None and (m := _QUANT_LINE.match(text)):
            on_tensor(int(m.group(1)) - 1, int(m.group(2)))

    _lc.llama_log_set(log, ctypes.c_void_p(0))
    try:
        rc = _lc.llama_model_quantize(str(src).encode("utf-8"), str(dst).encode("utf-8"), ctypes.byref(params))
    finally:
        set_verbose(_verbose)
    if rc != 0:
        reason = next((e for e in reversed(errors) if e), "no reason logged")
        raise TrimixError(f"llama.cpp could not quantize {src}: {reason}")


class KVCacheFullError(TrimixError):
    """llama.cpp found no free KV cell for a batch (``llama_decode`` returned 1)."""


class LlamaModel:
    """One GGUF model with one llama.cpp context holding up to ``n_seq`` sequences.

    Two layouts of the KV cache:

    * ``isolated=True`` (the default): every sequence has a cache of its own, ``n_ctx`` cells, and
      attention runs without llama.cpp's flash-attention kernel. A sequence's logits are then
      bit-for-bit those it has decoding alone, whatever other sequences decode in the same batch,
      start or end: this is what keeps one request from changing another's output. With one
      shared cache (``isolated=False``), the cells freed by a sequence that ends are reused by the
      ones that continue, in a different order than alone, and llama.cpp's CPU flash attention
      sums the cells in cell order with a half-precision accumulator, so the continuing
      sequences' logits move (by 0.5-1.7 on SmolLM2-135M); without flash attention, a shared
      cache still puts every sequence's queries in one matrix product whose kernel depends on the
      batch. :meth:`seq_cp` copies a sequence's whole cache in this layout.
    * ``isolated=False``: one unified cache of ``kv_cells`` cells that every sequence draws on;
      :meth:`seq_cp` shares a prompt's cells without copying. Evaluation uses it, where dozens of
      sequences continue one long prompt and copying it for each would multiply the memory.

    The object owns the model and the context and frees them in :meth:`close`, which the
    context-manager protocol calls, so a run holding three models releases them deterministically
    rather than whenever the garbage collector gets to them.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        n_ctx: int = 4096,
        n_batch: int = 512,
        n_seq: int = 1,
        kv_cells: int | None = None,
        n_threads: int | None = None,
        n_gpu_layers: int = -1,
        vocab_only: bool = False,
        isolated: bool = True,
        exact_attention: bool = False,
    ) -> None:
        _ensure_backend()
        self.path = Path(path)
        check_load_numbers(n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads)
        if isinstance(n_seq, bool) or not isinstance(n_seq, int) or not 1 <= n_seq <= MAX_SEQ:
            raise TrimixError(
                "{n_seq} must be a whole number from 1 to {hi}, got {got!r}", param="n_seq", hi=MAX_SEQ, got=n_seq
            )
        if isolated:
            if kv_cells is not None:
                raise TrimixError("kv_cells sizes a cache shared by every sequence: pass it with isolated=False")
            cells = n_ctx * n_seq  # llama.cpp gives each sequence n_ctx cells of its own
        else:
            cells = n_ctx if kv_cells is None else kv_cells
        if isinstance(cells, bool) or not isinstance(cells, int) or not 1 <= cells <= MAX_N_CTX:
            raise TrimixError(
                "the KV cache must hold 1 to {hi} cells, got {got!r} (lower {n_ctx} or {n_seq})",
                param="n_ctx",
                hi=MAX_N_CTX,
                got=cells,
            )
        if not vocab_only and cells < n_seq:  # llama.cpp aborts creating such a context (see MIN_N_CTX)
            raise TrimixError(
                "a KV cache of {cells} cells cannot hold {n} sequences (raise {n_ctx})",
                param="n_ctx",
                cells=cells,
                n=n_seq,
            )
        check_gguf_file(self.path)
        self._model = None
        self._ctx = None
        self._logits_addr = 0
        self._logits_view: np.ndarray | None = None
        self._rows_view: tuple[int, np.ndarray] | None = None

        mparams = _lc.llama_model_default_params()
        if n_gpu_layers < 0:
            n_gpu_layers = 999 if gpu_offload_supported() else 0
        mparams.n_gpu_layers = n_gpu_layers
        mparams.vocab_only = vocab_only
        mparams.use_extra_bufts = extra_buffers_usable()
        model = _lc.llama_model_load_from_file(str(self.path).encode("utf-8"), mparams)
        if not model:
            raise ModelFileError(
                "llama.cpp could not load {path} (corrupt, truncated or an architecture this "
                "llama.cpp does not know; rerun with {verbose} to see llama.cpp's log)",
                param="verbose",
                path=self.path,
            )
        self._model = model
        self._vocab = _lc.llama_model_get_vocab(model)
        self.n_vocab = int(_lc.llama_vocab_n_tokens(self._vocab))
        self.n_ctx_train = int(_lc.llama_model_n_ctx_train(model))
        self.add_bos = bool(_lc.llama_vocab_get_add_bos(self._vocab))
        self.bos_id = int(_lc.llama_vocab_bos(self._vocab))
        self.n_ctx = 0
        self.n_batch = 0
        self.n_seq = n_seq
        self.kv_cells = 0
        self.isolated = isolated
        if vocab_only:
            return

        if n_threads is None or n_threads <= 0:
            n_threads = default_threads()
        cparams = _lc.llama_context_default_params()
        cparams.n_ctx = cells
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq
        cparams.kv_unified = not isolated
        if isolated:
            cparams.flash_attn_type = _lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        cparams.no_perf = True
        if exact_attention:
            # float32 K/V cells and no flash attention (whose CPU kernel rounds to f16): attention in
            # float32 throughout, for comparing logits with a reference computation
            cparams.type_k = cparams.type_v = 0  # GGML_TYPE_F32
            cparams.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = _lc.llama_init_from_model(model, cparams)
        if not ctx:
            self.close()
            raise ModelFileError(
                "llama.cpp could not create a context of {cells} KV cells for {path} "
                "(out of memory? try a smaller {n_ctx} or {n_seq})",
                param="n_ctx",
                cells=cells,
                path=self.path,
            )
        self._ctx = ctx
        # llama.cpp rounds the cache up (to a multiple of 256) and clamps the batch to the context
        # it was asked for; a batch longer than its real n_batch aborts the process. So both are
        # read back, and what the caller asked for stays the limit when llama.cpp allocated more.
        self.kv_cells = min(cells, int(_lc.llama_n_ctx(ctx)))
        per_seq = int(_lc.llama_n_ctx_seq(ctx)) if isolated else self.kv_cells
        self.n_ctx = min(n_ctx, per_seq)
        self.n_batch = min(n_batch, int(_lc.llama_n_batch(ctx)), int(_lc.llama_n_ubatch(ctx)))
        self._mem = _lc.llama_get_memory(ctx)
        nb = self.n_batch
        self._b_token = np.zeros(nb, dtype=np.int32)
        self._b_pos = np.zeros(nb, dtype=np.int32)
        self._b_nseq = np.ones(nb, dtype=np.int32)
        self._b_seq = np.zeros(nb, dtype=np.int32)
        self._b_logits = np.zeros(nb, dtype=np.int8)
        seq_ptr = ctypes.POINTER(ctypes.c_int32)
        base = self._b_seq.ctypes.data
        self._b_seq_ptrs = (seq_ptr * nb)(*(ctypes.cast(base + 4 * i, seq_ptr) for i in range(nb)))
        # llama_batch_init allocates one seq-id array per token, which would make filling a batch a
        # Python loop over its tokens. Here every array of the batch is a numpy buffer (the seq ids
        # contiguous, each token's pointer aimed at its own slot once), so a batch is filled with
        # slice assignments, and nothing needs llama_batch_free.
        self._batch = _lc.llama_batch()
        self._batch.token = self._b_token.ctypes.data_as(ctypes.POINTER(_lc.llama_token))
        self._batch.embd = None
        self._batch.pos = self._b_pos.ctypes.data_as(ctypes.POINTER(_lc.llama_pos))
        self._batch.n_seq_id = self._b_nseq.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        self._batch.seq_id = ctypes.cast(self._b_seq_ptrs, type(self._batch.seq_id))
        self._batch.logits = self._b_logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.n_past = 0  # positions of sequence 0 filled by the single-sequence helpers below
        self.n_decoded = 0  # tokens this context has decoded since it was created
        self.decode_s = 0.0  # seconds spent in llama_decode since it was created

    # -- lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Free the context and the model (idempotent)."""
        if self._ctx is not None:
            _lc.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            _lc.llama_model_free(self._model)
            self._model = None
        self._logits_view = None
        self._rows_view = None

    def __enter__(self) -> LlamaModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a safety net only; callers close explicitly
        try:
            self.close()
        except Exception:
            pass

    def set_threads(self, n_threads: int) -> None:
        """Compute with ``n_threads`` threads from the next decode on (0: every core)."""
        check_load_numbers(n_ctx=MIN_N_CTX, n_batch=1, n_threads=n_threads)
        n = n_threads or default_threads()
        _lc.llama_set_n_threads(self._ctx, n, n)

    # -- metadata and vocabulary ------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        """A metadata value as text, or None when the GGUF has no such key."""
        buf = ctypes.create_string_buffer(512)
        n = _lc.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            _lc.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def description(self) -> str:
        buf = ctypes.create_string_buffer(256)
        _lc.llama_model_desc(self._model, buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def size_bytes(self) -> int:
        return int(_lc.llama_model_size(self._model))

    def n_params(self) -> int:
        return int(_lc.llama_model_n_params(self._model))

    def token_pieces(self, special: bool) -> list[bytes]:
        """The bytes of every token id, in id order.

        With ``special=False`` control tokens render as nothing: these are the bytes a token adds to
        generated text. With ``special=True`` they render as their text (``<|im_end|>``), which is what
        the vocabulary comparison between models needs.
        """
        vocab = self._vocab
        buf = ctypes.create_string_buffer(256)
        fn = _lc.llama_token_to_piece
        out: list[bytes] = []
        append = out.append
        for tok in range(self.n_vocab):
            n = fn(vocab, tok, buf, 256, 0, special)
            if n < 0:
                big = ctypes.create_string_buffer(-n)
                n = fn(vocab, tok, big, -n, 0, special)
                append(big.raw[:n])
            else:
                append(buf.raw[:n])
        return out

    def is_eog(self, token: int) -> bool:
        return bool(_lc.llama_vocab_is_eog(self._vocab, token))

    def token_attrs(self) -> np.ndarray:
        """llama.cpp's attribute bit flags (control, unused, byte, ...) for every token id."""
        fn = _lc.llama_vocab_get_attr
        vocab = self._vocab
        return np.fromiter((fn(vocab, t) for t in range(self.n_vocab)), dtype=np.int32, count=self.n_vocab)

    def tokenize(self, text: str, add_bos: bool, special: bool = False) -> np.ndarray:
        """Token ids of ``text`` as an int32 array. With ``special`` the text of control tokens
        (``<|im_start|>``) becomes those tokens, as llama.cpp does for chat templates; without it,
        such text is tokenized as plain characters."""
        data = text.encode("utf-8")
        cap = len(data) + 8
        arr = (_lc.llama_token * cap)()
        n = _lc.llama_tokenize(self._vocab, data, len(data), arr, cap, add_bos, special)
        if n < 0:
            cap = -n
            arr = (_lc.llama_token * cap)()
            n = _lc.llama_tokenize(self._vocab, data, len(data), arr, cap, add_bos, special)
        if n < 0:
            raise TrimixError(f"llama.cpp could not tokenize the prompt of {len(data)} bytes (report this)")
        return np.ctypeslib.as_array(arr)[:n].astype(np.int32)

    # -- the KV cache -----------------------------------------------------------------------------

    def clear(self) -> None:
        """Empty the whole KV cache (every sequence)."""
        _lc.llama_memory_clear(self._mem, False)
        self.n_past = 0

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        """Drop positions [p0, p1) of a sequence (-1: open end); the cells become free."""
        _lc.llama_memory_seq_rm(self._mem, seq, p0, p1)
        if seq == 0:
            self.n_past = min(self.n_past, p0) if p0 >= 0 else 0

    def seq_cp(self, src: int, dst: int) -> None:
        """Give ``dst`` (empty) every position of ``src``: in the unified layout the cells gain a
        sequence (no copy); in the isolated one llama.cpp copies ``src``'s cache into ``dst``'s at
        the next decode (it copies whole caches only, hence no position range here)."""
        _lc.llama_memory_seq_cp(self._mem, src, dst, -1, -1)

    def seq_pos_max(self, seq: int) -> int:
        """The last position a sequence holds, -1 when empty."""
        return int(_lc.llama_memory_seq_pos_max(self._mem, seq))

    # -- evaluation -------------------------------------------------------------------------------

    def decode_batch(
        self, tokens: np.ndarray, pos: np.ndarray | int, seq: np.ndarray | int, outputs: np.ndarray | int
    ) -> None:
        """Decode up to ``n_batch`` tokens, each with its position, sequence and output flag.

        ``pos``, ``seq`` and ``outputs`` are arrays the length of ``tokens`` or one value for all.
        Logits of the i-th output token are then row i of :meth:`logits_rows`.
        """
        n = len(tokens)
        if n == 0 or n > self.n_batch:
            raise ValueError(f"decode takes 1..{self.n_batch} tokens, got {n}")
        self._b_token[:n] = tokens
        self._b_pos[:n] = pos
        self._b_seq[:n] = seq
        self._b_logits[:n] = outputs
        self._batch.n_tokens = n
        t0 = time.perf_counter()
        rc = _lc.llama_decode(self._ctx, self._batch)
        self.decode_s += time.perf_counter() - t0
        if rc == 1:
            raise KVCacheFullError(
                "the KV cache of {name} is full ({cells} cells): raise {n_ctx} or lower {n_seq}",
                param="n_ctx",
                name=self.path.name,
                cells=self.kv_cells,
            )
        if rc != 0:
            raise self._decode_failed(rc)
        self.n_decoded += n

    def _decode_failed(self, rc: int) -> TrimixError:
        return TrimixError(
            "llama_decode failed with code {rc} for {name} (rerun with {verbose})",
            param="verbose",
            rc=rc,
            name=self.path.name,
        )

    def decode(self, tokens: np.ndarray, outputs: np.ndarray | None = None) -> None:
        """Append up to ``n_batch`` tokens to sequence 0 (the single-sequence helper).

        ``outputs`` marks the positions whose logits llama.cpp should compute; ``None`` asks for
        the last position only.
        """
        n = len(tokens)
        if self.n_past + n > self.n_ctx:
            raise ContextOverflowError(
                "the sequence needs {need} positions but the context holds {n} (raise {n_ctx} or shorten the prompt)",
                param="n_ctx",
                need=self.n_past + n,
                n=self.n_ctx,
            )
        if outputs is None:
            flags = np.zeros(n, dtype=np.int8)
            flags[n - 1] = 1
        else:
            flags = outputs
        self.decode_batch(tokens, np.arange(self.n_past, self.n_past + n, dtype=np.int32), 0, flags)
        self.n_past += n

    def decode_one(self, token: int) -> None:
        """One token appended to sequence 0, its logits computed."""
        if self.n_past >= self.n_ctx:
            raise ContextOverflowError("the context of {n} tokens is full (raise {n_ctx})", param="n_ctx", n=self.n_ctx)
        self._b_token[0] = token
        self._b_pos[0] = self.n_past
        self._b_seq[0] = 0
        self._b_logits[0] = 1
        self._batch.n_tokens = 1
        t0 = time.perf_counter()
        rc = _lc.llama_decode(self._ctx, self._batch)
        self.decode_s += time.perf_counter() - t0
        if rc != 0:
            raise self._decode_failed(rc)
        self.n_past += 1
        self.n_decoded += 1

    def logits_row(self, i: int = -1) -> np.ndarray:
        """A zero-copy float32 view of the logits of output ``i`` of the last decode.

        The view points into llama.cpp's own buffer and is valid until this model's next decode.
        """
        ptr = _lc.llama_get_logits_ith(self._ctx, i)
        addr = ctypes.cast(ptr, ctypes.c_void_p).value
        if not addr:
            raise TrimixError(f"no logits at output {i} of the last decode of {self.path.name}")
        if addr != self._logits_addr or self._logits_view is None:
            self._logits_addr = addr
            self._logits_view = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return self._logits_view

    def logits_rows(self, n_outputs: int) -> np.ndarray:
        """A zero-copy (n_outputs, n_vocab) view of every output of the last decode, in batch order."""
        ptr = _lc.llama_get_logits(self._ctx)
        addr = ctypes.cast(ptr, ctypes.c_void_p).value
        if not addr:
            raise TrimixError(f"no logits from the last decode of {self.path.name}")
        cached = self._rows_view
        if cached is None or cached[0] != addr or len(cached[1]) < n_outputs:
            # one view of the largest output count seen, sliced: making a view costs more than a step's
            # bookkeeping, and llama.cpp keeps its buffer where it is between decodes
            self._rows_view = (addr, np.ctypeslib.as_array(ptr, shape=(max(n_outputs, self.n_seq), self.n_vocab)))
        return self._rows_view[1][:n_outputs]


# -- ggml's row quantizer, for the converter's q8_0 ------------------------------------------------------

_GGML_TYPE_Q8_0 = 8  # enum ggml_type
_Q8_0_BLOCK, _Q8_0_BYTES = 32, 34  # weights per block; bytes per block (an f16 scale and 32 int8)
_quantize_chunk: Any = None  # ggml_quantize_chunk once looked up; False when this build does not export it


def _ggml_quantize_chunk() -> Any:
    """``ggml_quantize_chunk`` from the ggml library llama-cpp-python ships (``libggml-base``, reached
    directly or through ``libggml``), or None when neither exports it."""
    global _quantize_chunk
    if _quantize_chunk is None:
        _quantize_chunk = False
        libs: list[Any] = []
        try:
            from llama_cpp import _ctypes_extensions

            libs.append(_ctypes_extensions.load_shared_library("ggml-base", Path(_lc.__file__).parent / "lib"))
        except (ImportError, OSError, RuntimeError, FileNotFoundError):
            pass
        try:
            from llama_cpp import _ggml

            libs.append(_ggml.libggml)
        except (ImportError, OSError, RuntimeError, FileNotFoundError, AttributeError):
            pass
        for lib in libs:
            fn = getattr(lib, "ggml_quantize_chunk", None)
            if fn is not None:
                fn.restype = ctypes.c_size_t
                fn.argtypes = [
                    ctypes.c_int,  # enum ggml_type type
                    ctypes.c_void_p,  # const float * src
                    ctypes.c_void_p,  # void * dst
                    ctypes.c_int64,  # int64_t start (elements)
                    ctypes.c_int64,  # int64_t nrows
                    ctypes.c_int64,  # int64_t n_per_row
                    ctypes.c_void_p,  # const float * imatrix
                ]
                _quantize_chunk = fn
                break
    return _quantize_chunk or None


def q8_0_available() -> bool:
    """Whether :func:`quantize_q8_0` can use ggml's quantizer in this llama-cpp-python."""
    return _ggml_quantize_chunk() is not None


def quantize_q8_0(rows: np.ndarray) -> np.ndarray:
    """Float32 rows (a 2-D array whose rows are whole 32-weight blocks) as Q8_0 blocks, shape
    ``(rows, row_len / 32 * 34)`` uint8, by ggml's own reference row quantizer: the bytes llama.cpp's
    tools write, and the same bytes as the ``gguf`` package's numpy encoder (which mirrors it), about an
    order of magnitude faster. ctypes releases the GIL for the call, so threads quantize in parallel.

    The caller checks the values are finite first (ggml does not: a NaN would give an undefined int8).
    """
    fn = _ggml_quantize_chunk()
    if fn is None:
        raise TrimixError("this llama-cpp-python does not export ggml_quantize_chunk (upgrade llama-cpp-python)")
    x = np.ascontiguousarray(rows, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] % _Q8_0_BLOCK:
        raise TrimixError(f"q8_0 needs rows of whole {_Q8_0_BLOCK}-weight blocks, got shape {x.shape}")
    out = np.empty((x.shape[0], x.shape[1] // _Q8_0_BLOCK * _Q8_0_BYTES), np.uint8)
    if x.size:
        written = fn(_GGML_TYPE_Q8_0, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
        if written != out.nbytes:
            raise TrimixError(f"ggml wrote {written} bytes of q8_0 for {out.nbytes} expected (report this)")
    return out
