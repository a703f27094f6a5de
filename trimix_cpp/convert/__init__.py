"""Hugging Face checkpoints to GGUF, and GGUF to smaller GGUF, without torch.

``convert_checkpoint`` reads a checkpoint folder (``config.json``, safetensors, tokenizer files)
with numpy and the ``gguf`` package and streams it into a GGUF file tensor by tensor, so a 7B model
converts in the memory of a few slabs of rows. f32, f16, bf16 and q8_0 are written directly; every
other type (``q4_k_m`` and the rest of llama.cpp's mixes) is written as f16 beside the output and
then quantized by llama.cpp's own quantizer (``quantize_gguf``), the scratch file removed after.

Supported: Qwen2/Qwen2.5 (``qwen2``), Llama 2 and 3.x (``llama``), Gemma 3 text models (``gemma3``).
Everything that can be wrong with a checkpoint is checked before the first byte is written, and an
output appears under its name only when it is complete.

    from trimix_cpp.convert import convert_checkpoint
    convert_checkpoint(Path("Qwen2.5-1.5B-bo-cpt"), Path("Qwen2.5-1.5B-bo-cpt-Q8_0.gguf"), out_type="q8_0")
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .architectures import SUPPORTED_ARCHITECTURES, UnsupportedArchitectureError
from .checkpoint import CheckpointError
from .outfile import OutputError, check_output, partial_beside
from .qtypes import CONVERT_TYPES, DIRECT_TYPES, check_type, estimated_bytes
from .quantize import quantize_gguf, quantized_tensor_types
from .stream import convert_direct, plan_conversion

__all__ = [
    "CONVERT_TYPES",
    "SUPPORTED_ARCHITECTURES",
    "CheckpointError",
    "OutputError",
    "UnsupportedArchitectureError",
    "convert_checkpoint",
    "quantize_gguf",
    "quantized_tensor_types",
]


def convert_checkpoint(
    checkpoint_dir: Path,
    out_path: Path,
    *,
    out_type: str = "f16",
    force: bool = False,
    threads: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Convert the checkpoint folder ``checkpoint_dir`` to the GGUF file ``out_path``; return its path.

    ``out_type`` is one of :data:`CONVERT_TYPES`. ``progress(stage, done, total)`` is called with
    stage ``"convert"`` (bytes of the checkpoint read) and, for types llama.cpp quantizes,
    ``"quantize"`` (tensors). ``threads`` is for the quantizer. Raises a :class:`TrimixError`
    subclass with one line on any problem, leaving nothing at ``out_path``.
    """
    out_type = check_type(out_type)
    out_path = check_output(Path(out_path), force=force)
    checkpoint_dir = Path(checkpoint_dir)
    if out_type in DIRECT_TYPES:
        plan = plan_conversion(checkpoint_dir, out_type)
        return convert_direct(plan, out_path, progress=progress)
    plan = plan_conversion(checkpoint_dir, "f16")
    scratch = partial_beside(out_path, ".f16")
    try:
        convert_direct(plan, scratch, progress=progress, room_extra=estimated_bytes(plan.n_weights, out_type))
        return quantize_gguf(scratch, out_path, out_type, threads=threads, force=force, progress=progress)
    finally:
        scratch.unlink(missing_ok=True)
