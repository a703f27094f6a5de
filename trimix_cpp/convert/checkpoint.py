"""A Hugging Face checkpoint folder read with numpy alone: ``config.json`` and its safetensors.

Why not the ``safetensors`` library or torch: conversion must run where neither is installed, and a
7B checkpoint must convert on a laptop. So tensors are read a slab of rows at a time with plain
``readinto`` into a small buffer (no memory map: pages of a mapped file count towards the process's
resident memory as they are touched, and a converter that walks a 15 GB checkpoint through a map
looks, and on a tight machine behaves, as if it held all of it).

Everything a damaged download can get wrong is checked when the folder is opened, before a byte
of output is written: a missing or truncated shard, an index naming a file that is not there, a
header that is not JSON, a tensor whose byte range does not fit its shape or its file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TrimixError

__all__ = ["Checkpoint", "CheckpointError", "SourceTensor", "bf16_to_f16", "to_float32"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# safetensors dtype -> (numpy dtype of the stored bits, bytes per element); BF16 is read as its
# 16-bit pattern and widened to float32 by a shift, which is exact.
DTYPES: dict[str, tuple[type[np.generic], int]] = {
    "F32": (np.float32, 4),
    "F16": (np.float16, 2),
    "BF16": (np.uint16, 2),
}
MAX_HEADER = 100 * 2**20  # the format's own limit on the JSON header


class CheckpointError(TrimixError):
    """The checkpoint folder is incomplete, damaged or not one trimix can convert."""


@dataclass(frozen=True)
class SourceTensor:
    """Where one tensor's bytes are: file, offset, dtype and shape, all checked against the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    offset: int
    nbytes: int

    @property
    def n_rows(self) -> int:
        """Rows of the tensor seen as a matrix (the first dimension; 1 for a vector)."""
        return self.shape[0] if len(self.shape) > 1 else 1

    @property
    def row_elems(self) -> int:
        """Elements per row (the product of every dimension but the first)."""
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else math.prod(self.shape)

    def read_raw(self, handle: Any, start: int, stop: int, buf: np.ndarray | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` as stored (float32, float16, or bfloat16 bit patterns as uint16),
        shape ``(stop - start, row_elems)``. ``handle`` is the open binary file of :attr:`path`; ``buf``, a
        uint8 array at least that large, is read into instead of a fresh array (and the result is a view of it)."""
        size = DTYPES[self.dtype][1]
        nbytes = (stop - start) * self.row_elems * size
        raw = buf[:nbytes] if buf is not None and buf.nbytes >= nbytes else np.empty(nbytes, np.uint8)
        handle.seek(self.offset + start * self.row_elems * size)
        if handle.readinto(memoryview(raw)) != raw.nbytes:
            raise CheckpointError(
                f"{self.path} ended while reading tensor {self.name} (the file is truncated; download it again)"
            )
        return raw.view(DTYPES[self.dtype][0]).reshape(stop - start, self.row_elems)

    def read_rows(self, handle: Any, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as float32, shape ``(stop - start, row_elems)``."""
        return to_float32(self.read_raw(handle, start, stop))


def to_float32(raw: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Stored values (float32, float16, or bfloat16 bit patterns as uint16) as float32, written into ``out``
    (a float32 array of at least ``raw.size`` elements) when given; float32 input is returned as it is.

    bfloat16 is the top half of a float32, so widening it is a 16-bit shift of each pattern, exact, in one pass.
    """
    if raw.dtype == np.float32:
        return raw
    dst = np.empty(raw.shape, np.float32) if out is None or out.size < raw.size else out[: raw.size].reshape(raw.shape)
    if raw.dtype == np.uint16:
        np.left_shift(raw, 16, out=dst.view(np.uint32), dtype=np.uint32)
    else:
        dst[...] = raw
    return dst


def bf16_to_f16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) to float16, exactly as widening to float32 and rounding would
    give (checked over all 65,536 patterns), in a few integer passes instead of a float conversion.

    Within float16's normal range the conversion only re-biases the exponent and shifts the 7 mantissa
    bits into the 10 of float16; the rest (zeros, tiny values that become subnormal, values beyond
    float16's range, NaN) is a small share of any weight matrix and goes through float32.
    """
    mag = bits & 0x7FFF
    out = ((mag - 0x3800) << 3) | (bits & 0x8000)  # exponent 127 -> 15 bias; wraps outside the range fixed below
    odd = (mag < 0x3880) | (mag > 0x477F)  # below 2**-14 or from 65,536 up (inf and NaN included)
    if odd.any():
        idx = np.flatnonzero(odd)
        wide = bits.ravel()[idx].astype(np.uint32) << 16
        with np.errstate(over="ignore"):  # beyond float16 becomes inf, which the caller reports
            out.ravel()[idx] = wide.view(np.float32).astype(np.float16).view(np.uint16)
    return out.view(np.float16)


class Checkpoint:
    """``config.json`` plus every safetensors tensor of a checkpoint folder, validated on open."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        if not self.dir.exists():
            raise CheckpointError(f"checkpoint folder not found: {self.dir} (give the folder with config.json)")
        if not self.dir.is_dir():
            raise CheckpointError(
                f"{self.dir} is not a folder (give the checkpoint folder holding config.json and *.safetensors)"
            )
        self.config = self._read_config()
        self.files = self._shard_files()
        self.tensors: dict[str, SourceTensor] = {}
        for path in self.files:
            for t in _read_header(path):
                if t.name in self.tensors:
                    raise CheckpointError(
                        f"tensor {t.name} is stored twice ({self.tensors[t.name].path.name} and {path.name}); "
                        "the checkpoint folder mixes two downloads: download it again into an empty folder"
                    )
                self.tensors[t.name] = t

    def _read_config(self) -> dict[str, Any]:
        path = self.dir / "config.json"
        if not path.is_file():
            raise CheckpointError(
                f"{self.dir} has no config.json (is it a Hugging Face checkpoint folder? download it complete)"
            )
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} is not valid JSON ({e}); download it again") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{path} is not a JSON object; download it again")
        return config

    def _shard_files(self) -> list[Path]:
        index = self.dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                names = sorted(set(weight_map.values()))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index} is not a safetensors index ({e}); download it again") from None
            if not names or not all(isinstance(n, str) for n in names):
                raise CheckpointError(f"{index} names no safetensors files; download it again")
            files = []
            for name in names:
                path = self.dir / name
                if Path(name).name != name or not path.is_file():
                    raise CheckpointError(
                        f"{index.name} names {name}, which is not in {self.dir} "
                        "(the download is incomplete: fetch the missing shard)"
                    )
                files.append(path)
            return files
        single = self.dir / SINGLE_NAME
        if single.is_file():
            return [single]
        found = sorted(self.dir.glob("*.safetensors"))
        if len(found) == 1:
            return found
        if found:
            raise CheckpointError(
                f"{self.dir} has {len(found)} safetensors files but no {INDEX_NAME} to say which belong together "
                "(download the index too)"
            )
        if any(self.dir.glob("*.bin")) or any(self.dir.glob("*.pth")):
            raise CheckpointError(
                f"{self.dir} holds PyTorch .bin/.pth weights, which trimix does not read "
                "(download the safetensors version of the checkpoint)"
            )
        raise CheckpointError(f"{self.dir} has no *.safetensors weights (download them too)")

    def tensor_bytes(self) -> int:
        """Bytes of every tensor stored, for progress and the disk check."""
        return sum(t.nbytes for t in self.tensors.values())

    def open_files(self) -> dict[Path, Any]:
        """One open binary handle per shard; the caller closes them."""
        return {p: p.open("rb") for p in self.files}


def _read_header(path: Path) -> Iterator[SourceTensor]:
    """The tensors of one safetensors file, each byte range checked against the file's real size."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is empty or truncated (download it again)")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path} is truncated or is not a safetensors file (download it again)")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not JSON); download it again") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not a JSON object)")
    base = 8 + n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = meta["dtype"]
            shape = tuple(int(d) for d in meta["shape"])
            start, stop = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: the entry of tensor {name} is malformed; download the file again") from None
        if dtype not in DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name} is stored as {dtype}; trimix converts F32, F16 and BF16 checkpoints "
                "(a quantized checkpoint needs its original weights)"
            )
        if any(d < 0 for d in shape) or stop - start != math.prod(shape) * DTYPES[dtype][1] or start < 0:
            raise CheckpointError(f"{path}: tensor {name}'s byte range does not match its shape {list(shape)}")
        if base + stop > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name} ends at byte {base + stop:,} of a {size:,}-byte file "
                "(download it again)"
            )
        yield SourceTensor(name, dtype, shape, path, base + start, stop - start)
