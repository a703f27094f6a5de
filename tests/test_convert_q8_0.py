"""q8_0 as the converter writes it: ggml's own row quantizer gives the bytes of the reference encoder.

The reference is the ``gguf`` package's numpy Q8_0 encoder (a port of llama.cpp's reference
``quantize_row_q8_0_ref``), which the converter used before and still falls back to. The fast path
must give the same bytes on every kind of block: ordinary weights, all-zero blocks, exact ties
(``k + 0.5`` after scaling, which round away from zero), values whose scale overflows f16, subnormal
values, and arbitrary finite bit patterns; whole conversions must give identical files; and NaN or
infinite weights are still refused with one line, while huge finite ones (which overflow a float32
sum) are not.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import tinyckpt

from trimix_cpp._llama import q8_0_available, quantize_q8_0
from trimix_cpp.convert import convert_checkpoint, stream

pytestmark = pytest.mark.skipif(not q8_0_available(), reason="this llama-cpp-python lacks ggml_quantize_chunk")


def reference(x: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):  # overflowing scales become inf in both encoders
        return gguf.quants.quantize(np.ascontiguousarray(x, np.float32), gguf.GGMLQuantizationType.Q8_0)


def edge_blocks() -> np.ndarray:
    """Rows of 64 weights (two blocks each) covering the cases where an encoder could differ."""
    rng = np.random.default_rng(7)
    rows = [rng.standard_normal(64) * 0.02, np.zeros(64), rng.standard_normal(64) * 3e38]
    tie = np.zeros(64)
    tie[0], tie[1:32] = 127.0, np.arange(31) + 0.5  # the scale is exactly 1: every other weight is a tie
    tie[32], tie[33:] = -127.0, -(np.arange(31) + 0.5)
    rows.append(tie)
    rows.append(rng.standard_normal(64) * 1e-41)  # subnormal weights and scale
    rows.append(rng.standard_normal(64) * 1e-30)  # a scale that is subnormal in f16
    one = np.zeros(64)
    one[5], one[40] = -2.5e-3, 7.0  # one non-zero weight per block
    rows.append(one)
    half_below = np.float32(0.5) - np.float32(2**-25)  # the largest float32 below one half
    rows.append(np.concatenate([[127.0], np.full(31, half_below), [-127.0], np.full(31, -half_below)]))
    with np.errstate(over="ignore"):
        return np.array(rows, dtype=np.float32)


def test_ggml_q8_0_equals_the_reference_on_edge_blocks() -> None:
    x = edge_blocks()
    assert np.array_equal(quantize_q8_0(x), reference(x))


def test_ggml_q8_0_equals_the_reference_on_random_data() -> None:
    rng = np.random.default_rng(11)
    for scale in (0.02, 1.0, 1e4):
        x = (rng.standard_normal((97, 1536)) * scale).astype(np.float32)
        x[3] = 0
        x[10, :32] = 0
        assert np.array_equal(quantize_q8_0(x), reference(x)), scale
    bits = rng.integers(0, 2**32, size=(128, 512), dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.where(np.isfinite(bits), bits, np.float32(0))  # every finite float32 bit pattern is fair game
    assert np.array_equal(quantize_q8_0(x), reference(x))


def test_ggml_q8_0_refuses_rows_that_are_not_whole_blocks() -> None:
    with pytest.raises(Exception, match="whole 32-weight blocks"):
        quantize_q8_0(np.zeros((2, 48), np.float32))


# qwen2 from F32 weights; llama3 from BF16 (the widening path) with its permuted Q/K rows
@pytest.mark.parametrize(("family", "dtype"), [("qwen2", "F32"), ("llama3", "BF16")])
def test_a_conversion_gives_the_reference_file(
    family: str, dtype: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tinyckpt.write_checkpoint(tmp_path / "ckpt", family, seed=5, hidden=128)
    w = tinyckpt.read_safetensors(folder / "model.safetensors")
    name = next(n for n in w if n.endswith("mlp.up_proj.weight"))
    w[name][0] = 0  # a row of all-zero blocks
    w[name][1, :32] = 3e38  # a block whose scale overflows f16, and a sum that overflows float32
    tinyckpt.write_safetensors(folder / "model.safetensors", {k: v.astype(np.float32) for k, v in w.items()}, dtype)
    fast = convert_checkpoint(folder, tmp_path / "fast.gguf", out_type="q8_0")
    monkeypatch.setattr(stream, "_FAST_Q8_0", False)
    slow = convert_checkpoint(folder, tmp_path / "reference.gguf", out_type="q8_0")
    assert fast.read_bytes() == slow.read_bytes()
    types = {t.tensor_type for t in gguf.GGUFReader(fast).tensors if len(t.shape) > 1}
    assert types == {gguf.GGMLQuantizationType.Q8_0}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_infinite_weights_are_refused_in_q8_0(bad: float, tmp_path: Path) -> None:
    folder = tinyckpt.write_checkpoint(tmp_path / "ckpt", "qwen2", seed=3)
    w = tinyckpt.read_safetensors(folder / "model.safetensors")
    w["model.layers.1.mlp.down_proj.weight"][3, 5] = bad
    tinyckpt.write_safetensors(folder / "model.safetensors", {k: v.astype(np.float32) for k, v in w.items()})
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "COLUMNS": "400"}
    cmd = [sys.executable, "-m", "trimix_cli.main", "models", "convert", str(folder), "-o", str(out / "m.gguf")]
    res = subprocess.run([*cmd, "--type", "q8_0"], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 1, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and "━" not in ln]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "model.layers.1.mlp.down_proj.weight" in lines[0] and "NaN or infinite" in lines[0], lines[0]
    assert list(out.iterdir()) == []
