"""The output types ``convert`` and ``quantize`` accept, and who produces each.

f32, f16, bf16 and q8_0 are written straight from the checkpoint with numpy (the ``gguf``
package's reference encoders), one slab of rows at a time. Every other type comes from llama.cpp's
own quantizer, which picks per-tensor types for the K-quant mixes (``q4_k_m`` keeps some tensors at
``q6_k``) exactly as llama.cpp's tools do.
"""

from __future__ import annotations

import gguf

from ..errors import TrimixError

__all__ = ["CONVERT_TYPES", "DIRECT_TYPES", "FTYPES", "check_type", "estimated_bytes"]

T = gguf.GGMLQuantizationType
F = gguf.LlamaFileType

# name -> llama.cpp's llama_ftype (general.file_type), in order of decreasing size
FTYPES: dict[str, F] = {
    "f32": F.ALL_F32,
    "f16": F.MOSTLY_F16,
    "bf16": F.MOSTLY_BF16,
    "q8_0": F.MOSTLY_Q8_0,
    "q6_k": F.MOSTLY_Q6_K,
    "q5_k_m": F.MOSTLY_Q5_K_M,
    "q5_k_s": F.MOSTLY_Q5_K_S,
    "q5_1": F.MOSTLY_Q5_1,
    "q5_0": F.MOSTLY_Q5_0,
    "q4_k_m": F.MOSTLY_Q4_K_M,
    "q4_k_s": F.MOSTLY_Q4_K_S,
    "q4_1": F.MOSTLY_Q4_1,
    "q4_0": F.MOSTLY_Q4_0,
    "q3_k_l": F.MOSTLY_Q3_K_L,
    "q3_k_m": F.MOSTLY_Q3_K_M,
    "q3_k_s": F.MOSTLY_Q3_K_S,
    "q2_k": F.MOSTLY_Q2_K,
}
CONVERT_TYPES: tuple[str, ...] = tuple(FTYPES)

# types the converter writes itself: name -> the ggml type of every matrix
DIRECT_TYPES: dict[str, T] = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}

# Bits per weight that bound a file of each type from above: the K-quant mixes keep some tensors at
# q6_k (6.5625 bits) or, for the output layer, q8_0-like sizes, so the bound is the larger of the two.
_UPPER_BPW: dict[str, float] = {"f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5}


def check_type(out_type: str) -> str:
    """The canonical (lower-case) name of ``out_type``, or one line listing the accepted ones."""
    name = str(out_type).lower()
    if name not in FTYPES:
        raise TrimixError(f"unknown output type {out_type!r}; choose one of: {', '.join(CONVERT_TYPES)}")
    return name


def estimated_bytes(n_weights: int, out_type: str) -> int:
    """An upper bound on the tensor bytes of ``n_weights`` weights stored as ``out_type``, for the disk check."""
    bpw = _UPPER_BPW.get(out_type, 8.5)
    return int(n_weights * bpw / 8) + 2**20
