"""GGUF to GGUF through llama.cpp's own quantizer, in a child process that Ctrl-C can stop.

Why a child process: ``llama_model_quantize`` is one blocking C call of minutes on a 7B model, with
no way to cancel it. Run in this process, Ctrl-C would wait for it to finish (or, forced, leave a
half-written file with the interpreter torn down around a running C thread). In a child of its own,
Ctrl-C reaches the child too, which dies at once (it keeps the default SIGINT action), and this
process removes the partial file. The child also isolates llama.cpp's memory: a quantizer that runs
out of memory kills only itself, and this process reports it in one line.

Progress is honest: llama.cpp logs a line as it starts each tensor, the child turns those into
``progress DONE TOTAL`` lines on its stdout, and the caller's ``progress("quantize", done, total)``
counts tensors.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from ..errors import TrimixError, flag
from ..gguf_check import check_gguf
from .outfile import check_output, check_room, partial_beside, publish
from .qtypes import FTYPES, check_type, estimated_bytes

__all__ = ["quantize_gguf", "quantized_tensor_types"]

Progress = Callable[[str, int, int], None]

# ggml types that hold full-precision weights; anything else is already quantized
_FLOAT_TYPES = {0, 1, 30}  # F32, F16, BF16


def quantized_tensor_types(path: Path) -> list[str]:
    """Names of the quantized types among the weight matrices of a (checked) GGUF file; empty when the
    file holds full-precision weights."""
    import gguf

    header = check_gguf(path)
    found = {t.ggml_type for t in header.tensors if len(t.dims) >= 2 and t.ggml_type not in _FLOAT_TYPES}
    return sorted(gguf.GGMLQuantizationType(t).name for t in found)


def quantize_gguf(
    in_path: Path,
    out_path: Path,
    out_type: str,
    *,
    threads: int | None = None,
    allow_requantize: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Quantize the GGUF at ``in_path`` to ``out_path`` as ``out_type`` (one of ``CONVERT_TYPES``).

    Refuses an input that is already quantized unless ``allow_requantize`` (each requantization adds
    its error to the previous one), an existing output unless ``force``, and a disk without room for
    the result. Nothing is left at ``out_path`` unless the call returns.
    """
    from .. import _llama

    out_type = check_type(out_type)
    in_path = Path(in_path)
    _llama.check_gguf_file(in_path)
    out_path = check_output(Path(out_path), force=force, inputs=(in_path,))
    n_threads = check_threads(threads)
    quantized = quantized_tensor_types(in_path)
    if quantized and not allow_requantize:
        raise TrimixError(
            "{path} is already quantized ({types}); quantizing it again adds a second rounding "
            "error: quantize the f16 or bf16 GGUF (or convert the checkpoint) instead, or pass {allow_requantize}",
            param="allow_requantize",
            path=in_path,
            types=", ".join(quantized),
        )
    header = check_gguf(in_path)
    n_weights = sum(_prod(t.dims) for t in header.tensors)
    check_room(out_path.parent, estimated_bytes(n_weights, out_type), f"a {out_type} GGUF of {n_weights:,} weights")
    partial = partial_beside(out_path)
    try:
        _run_child(in_path, partial, int(FTYPES[out_type]), n_threads, allow_requantize, progress)
        return publish(partial, out_path)
    finally:
        partial.unlink(missing_ok=True)


def _prod(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def check_threads(threads: int | None) -> int:
    from .._llama import MAX_THREADS, default_threads

    if threads is None or threads == 0:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or not 0 < threads <= MAX_THREADS:
        raise TrimixError(
            "{threads} must be from 1 to {hi} (0 or none: every core), got {got!r}",
            param="threads",
            hi=MAX_THREADS,
            got=threads,
        )
    return threads


def _run_child(
    src: Path, dst: Path, ftype: int, n_threads: int, allow_requantize: bool, progress: Progress | None
) -> None:
    from .._llama import is_verbose

    verbose = is_verbose()
    job = json.dumps(
        {
            "src": str(src),
            "dst": str(dst),
            "ftype": ftype,
            "threads": n_threads,
            "allow": allow_requantize,
            "verbose": verbose,
        }
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "trimix_cpp.convert.quantize", job],
        stdout=subprocess.PIPE,
        stderr=None if verbose else subprocess.DEVNULL,  # llama.cpp's log, with --verbose
        stdin=subprocess.DEVNULL,
        text=True,
        encoding="utf-8",
    )
    error = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            kind, _, rest = line.rstrip("\n").partition(" ")
            if kind == "progress" and progress is not None:
                done, total = (int(x) for x in rest.split())
                progress("quantize", done, total)
            elif kind == "error":
                error = rest
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if error:
        raise TrimixError(error)
    if rc == -signal.SIGINT:
        raise KeyboardInterrupt
    if rc != 0:
        how = f"was killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
        hint = " (out of memory?)" if rc == -signal.SIGKILL else ""
        raise TrimixError(f"the quantizer {how}{hint}; nothing was written")


def _child(job: str) -> int:
    """The child's side: run llama.cpp's quantizer, report progress and the outcome on stdout."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends the child at once, mid-call included
    spec = json.loads(job)
    from .. import _llama

    _llama.set_verbose(bool(spec.get("verbose")))

    seen = {"total": 0}

    def on_tensor(done: int, total: int) -> None:
        seen["total"] = total
        sys.stdout.write(f"progress {done} {total}\n")
        sys.stdout.flush()

    try:
        _llama.quantize_model(
            Path(spec["src"]),
            Path(spec["dst"]),
            spec["ftype"],
            n_threads=spec["threads"],
            allow_requantize=spec["allow"],
            on_tensor=on_tensor,
        )
    except TrimixError as e:
        sys.stdout.write(f"error {e.render(flag)}\n")  # the parent raises it again for the command line
        return 1
    if seen["total"]:
        sys.stdout.write(f"progress {seen['total']} {seen['total']}\n")
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
