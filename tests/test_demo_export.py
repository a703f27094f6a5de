"""The demo's export (models/demo/export.py) goes through trimix's converter and reproduces the shipped files.

The shipped small models were trained in float32 and stored as Q8_0. Dequantizing a Q8_0 block and
quantizing it again gives the same block (its largest weight is exactly 127 times the stored scale, so
the scale comes back and every weight rounds to its old integer), so the weights read back from a
shipped file, exported again through the checkpoint and the converter, must give that file's tensors
bit for bit: this pins the names, the Q/K layout round trip, the tie and the quantizer. The tokenizer
must come back as SmolLM2's, and llama.cpp must compute the same logits from both files.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest

from trimix_cpp._llama import LlamaModel
from trimix_cpp.packaged import smollm2_path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo"
sys.path.insert(0, str(DEMO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import export  # noqa: E402  (models/demo/export.py)
from test_convert_tokenizer import gguf_fields  # noqa: E402

# GGUF tensor name suffix inside block N -> TinyLlama state-dict suffix (written independently of export.py)
TORCH_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "attn_q.weight": "attn.wq.weight",
    "attn_k.weight": "attn.wk.weight",
    "attn_v.weight": "attn.wv.weight",
    "attn_output.weight": "attn.wo.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "ffn.gate.weight",
    "ffn_up.weight": "ffn.up.weight",
    "ffn_down.weight": "ffn.down.weight",
}
# Tokenizer keys the converter writes differently from the SmolLM2 file, both meaning what llama.cpp
# assumes for a byte-level BPE anyway: no space prefix (written by SmolLM2's file, left out by the
# converter for byte-level vocabularies) and no EOS appended (written explicitly by the converter).
FLAG_KEYS = {"tokenizer.ggml.add_space_prefix", "tokenizer.ggml.add_eos_token"}


def torch_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "embed.weight"
    if gguf_name == "output_norm.weight":
        return "norm.weight"
    _, index, rest = gguf_name.split(".", 2)
    return f"blocks.{index}.{TORCH_NAMES[rest]}"


def read_back(path: Path) -> tuple[dict[str, np.ndarray], SimpleNamespace]:
    """The float32 weights (TinyLlama keys) and the shape a demo GGUF file holds."""
    reader = gguf.GGUFReader(path)
    state = {torch_name(t.name): gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}

    def value(key: str) -> object:
        return reader.fields[key].contents()

    cfg = SimpleNamespace(
        vocab_size=int(value("llama.vocab_size")),
        d_model=int(value("llama.embedding_length")),
        n_layers=int(value("llama.block_count")),
        n_heads=int(value("llama.attention.head_count")),
        ffn_hidden=int(value("llama.feed_forward_length")),
        rope_base=float(value("llama.rope.freq_base")),
        rms_eps=1e-5,
        head_dim=int(value("llama.rope.dimension_count")),
    )
    return state, cfg


@pytest.mark.parametrize("name", ["small-base", "small-cpt"])
def test_export_through_the_converter_reproduces_the_shipped_file(name: str, tmp_path: Path) -> None:
    shipped = DEMO / f"{name}.gguf"
    state, cfg = read_back(shipped)
    out = export.export_state(state, cfg, tmp_path / f"{name}.gguf", f"trimix-demo-{name}", "q8_0")

    old, new = gguf.GGUFReader(shipped), gguf.GGUFReader(out)
    old_t = {t.name: t for t in old.tensors}
    new_t = {t.name: t for t in new.tensors}
    assert sorted(new_t) == sorted(old_t)  # the converter orders tensors its own way; llama.cpp reads them by name
    for tname, t in old_t.items():
        assert new_t[tname].tensor_type == t.tensor_type, tname
        assert list(new_t[tname].shape) == list(t.shape), tname
        assert np.array_equal(new_t[tname].data, t.data), f"{tname}: tensor bytes differ"

    for key in ("general.architecture", "general.file_type", "general.quantization_version", "general.name"):
        assert new.fields[key].contents() == old.fields[key].contents(), key
    for key, field in old.fields.items():
        if key.startswith("llama."):
            assert new.fields[key].contents() == field.contents(), key

    smol = gguf_fields(smollm2_path())
    got = gguf_fields(out)
    assert {k: v for k, v in got.items() if k not in FLAG_KEYS} == {k: v for k, v in smol.items() if k not in FLAG_KEYS}
    assert not got.get("tokenizer.ggml.add_space_prefix", False) and not got["tokenizer.ggml.add_eos_token"]

    # llama.cpp computes the same from both files: same tokens, same logits.
    text = "ئۇيغۇرچە تېكىست and English 123"
    results = []
    for path in (shipped, out):
        with LlamaModel(path, n_ctx=64, n_batch=64, n_threads=1, n_gpu_layers=0) as model:
            ids = model.tokenize(text, add_bos=False)
            model.decode(ids, outputs=np.ones(len(ids), np.int8))
            results.append((ids.tolist(), model.logits_rows(len(ids)).copy()))
    assert len(results[0][0]) > 10 and results[0][0] == results[1][0]
    assert np.array_equal(results[0][1], results[1][1])
