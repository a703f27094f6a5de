"""Checkpoints to GGUF: what llama.cpp computes from a converted file is what the checkpoint means.

For each of the paper's families a tiny checkpoint (tests/tinyckpt.py: random weights, the family's
real config keys, tokenizer type and storage dtype) is converted, loaded by real llama.cpp, and its
logits at every position of a multilingual prompt are compared with an independent float64 forward
pass of the checkpoint in its own conventions (tests/hf_forward.py).

Tolerances:
* f32: 1e-3 max abs. llama.cpp runs here with float32 K/V cells and without flash attention (whose CPU
  kernel rounds to f16); what remains is float32 arithmetic (about 3e-5 measured) and, for Gemma,
  ggml's GELU, which reads a table of f16 values: the reference rounds GELU's input and output to f16
  as that table does, leaving rare one-ulp flips at f16 rounding boundaries (4.5e-4 measured).
* q8_0 and q4_k_m: stated relative to the logits' standard deviation, from what the formats store
  (see the tests below).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import tinyckpt
from hf_forward import forward

from trimix_cpp._llama import LlamaModel
from trimix_cpp.convert import CONVERT_TYPES, SUPPORTED_ARCHITECTURES, convert_checkpoint, quantize_gguf
from trimix_cpp.convert.architectures import llama3_rope_divisors

CASES = {
    # family, checkpoint options: the conventions each case exercises
    "qwen2-tied": ("qwen2", {}),  # QKV biases, GQA, tied output, embedding padded past the tokenizer
    "qwen2-untied-sharded": ("qwen2", {"tied": False, "shards": 3}),  # Qwen2.5-7B's untied head, an index
    "llama2": ("llama2", {}),  # SentencePiece with a leading space, MHA, untied, F16 storage, Q/K permuted
    "llama3": ("llama3", {}),  # byte-level BPE, GQA, tied, llama3 RoPE scaling
    "gemma3": ("gemma3", {}),  # (1 + w) norms, Q/K norms, post norms, sliding window, linear RoPE, rows cut
    "llama3-f32": ("llama3", {"dtype": "F32", "tied": False}),  # F32 storage
    "gemma3-multimodal": ("gemma3", {"multimodal": True}),  # the text half of Gemma3ForConditionalGeneration
}


def llama_logits(path: Path, text: str = tinyckpt.PROMPT) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of ``text`` as llama.cpp tokenizes it with the converted tokenizer, and the logits at
    every position (float64 copy), attention computed in float32."""
    with LlamaModel(path, n_ctx=256, n_batch=256, n_gpu_layers=0, exact_attention=True) as m:
        ids = m.tokenize(text, add_bos=m.add_bos)
        m.decode(ids, outputs=np.ones(len(ids), np.int8))
        return ids, m.logits_rows(len(ids)).astype(np.float64).copy()


def reference(folder: Path, ids: np.ndarray, n_vocab: int) -> np.ndarray:
    return forward(folder, ids, ggml_gelu=True)[:, :n_vocab]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Every case converted to f32 once: name -> (checkpoint folder, GGUF)."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, (family, opts) in CASES.items():
        folder = tinyckpt.write_checkpoint(root / name, family, seed=len(out) + 1, **opts)
        out[name] = (folder, convert_checkpoint(folder, root / f"{name}.gguf", out_type="f32"))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_f32_logits_match_the_reference_forward_pass(converted: dict[str, tuple[Path, Path]], case: str) -> None:
    folder, path = converted[case]
    ids, got = llama_logits(path)
    assert len(ids) > 40  # the prompt is long enough to pass Gemma's 4-token sliding window many times
    ref = reference(folder, ids, got.shape[1])
    err = np.abs(got - ref).max()
    assert err < 1e-3, f"{case}: max abs logit difference {err:.2e} (logit std {ref.std():.2f})"
    # and the comparison can fail: the same logits a position off differ by far more than the tolerance
    assert np.abs(got[1:] - ref[:-1]).max() > 0.1


def test_vocabulary_rows_follow_each_family(converted: dict[str, tuple[Path, Path]]) -> None:
    """Qwen's embedding rows past its tokenizer become unused [PAD] tokens (as in Qwen's own GGUFs);
    Gemma's are cut off (as llama.cpp's converter does); a tokenizer as long as the embedding stays."""
    for case, expect_pad in (("qwen2-tied", 17), ("gemma3", 0), ("llama2", 0)):
        folder, path = converted[case]
        cfg = json.loads((folder / "config.json").read_text())
        r = gguf.GGUFReader(path)
        tokens = r.fields["tokenizer.ggml.tokens"].contents()
        rows = next(int(t.shape[1]) for t in r.tensors if t.name == "token_embd.weight")
        assert rows == len(tokens)
        n_real = cfg["vocab_size"] - {"qwen2-tied": 17, "gemma3": 5, "llama2": 0}[case]
        assert len(tokens) == n_real + expect_pad
        assert sum(t.startswith("[PAD") for t in tokens) == expect_pad


def test_metadata_carries_what_llama_cpp_and_trimix_need(converted: dict[str, tuple[Path, Path]]) -> None:
    _, path = converted["gemma3"]
    r = gguf.GGUFReader(path)
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == "gemma3"
    assert f["general.name"]
    assert f["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert f["gemma3.attention.sliding_window"] == 4
    assert f["gemma3.attention.sliding_window_pattern"] == [True, False, True]
    assert f["gemma3.rope.freq_base_swa"] == 10000.0
    assert f["gemma3.rope.scaling.factor"] == 8.0
    assert f["gemma3.attention.key_length"] == 32
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.bos_token_id"):
        assert key in f
    _, qpath = converted["qwen2-tied"]
    q = gguf.GGUFReader(qpath)
    assert "output.weight" not in {t.name for t in q.tensors}  # tied: llama.cpp reuses token_embd
    assert "blk.0.attn_q.bias" in {t.name for t in q.tensors}
    assert "{% for m in messages %}" in q.fields["tokenizer.chat_template"].contents()
    # norms stay F32 whatever the type; rope_freqs is there for Llama 3's scaling
    _, lpath = converted["llama3"]
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(lpath).tensors}
    assert "rope_freqs.weight" in types


def test_llama3_rope_divisors_cover_every_band() -> None:
    """The three bands of Llama 3's scaling (kept, blended, slowed by the factor) with the test config."""
    rs = tinyckpt.family_config("llama3")["rope_scaling"]
    d = llama3_rope_divisors(16, 10000.0, rs)
    assert d[0] == 1.0 and d[-1] == pytest.approx(8.0) and 1.0 < d[1] < 8.0


def test_provenance_from_the_model_card(tmp_path: Path) -> None:
    folder = tinyckpt.write_checkpoint(tmp_path / "Qwen2.5-1.5B-bo-cpt", "qwen2")
    (folder / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: Qwen/Qwen2.5-1.5B\n---\n# cpt\n")
    path = convert_checkpoint(folder, tmp_path / "out.gguf", out_type="f16")
    f = {k: v.contents() for k, v in gguf.GGUFReader(path).fields.items()}
    assert f["general.base_model.0.name"] == "Qwen2.5 1.5B"
    assert f["general.license"] == "apache-2.0"
    assert f["general.source.hf_architecture"] == "Qwen2ForCausalLM"


# -- quantized outputs ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each family 256 wide: rows K-quants can tile (256 weights per super-block), untied output."""
    root = tmp_path_factory.mktemp("wide")
    return {
        fam: tinyckpt.write_checkpoint(root / fam, fam, seed=7, hidden=256, layers=2, tied=False)
        for fam in tinyckpt.FAMILIES
    }


@pytest.mark.slow
@pytest.mark.parametrize("family", tinyckpt.FAMILIES)
def test_q8_0_and_q4_k_m_stay_close_to_the_reference(wide: dict[str, Path], tmp_path: Path, family: str) -> None:
    """Bounds on the root-mean-square logit error relative to the logits' standard deviation, from what
    the formats store. q8_0 rounds each weight to 1/127 of its 32-weight block's largest magnitude (about
    2.5 sigma for these Gaussian weights): noise about 0.6% of the weights' sigma, and llama.cpp rounds
    the activations to 8 bits for the same dot products; compounded over two layers of seven products and
    the output layer, about 3% of the logits' spread: bound 6%. q4_k_m's 4-bit steps (1/15 of a block's
    range; q6_k for some tensors) give about 10% per product, about 30% compounded: bound 45%. Random
    weights lack a trained model's redundancy, so real models lose far less. A layout error instead
    makes the logits unrelated: about 140%. Measured here (rms/std): q8_0 0.012-0.035, q4_k_m 0.10-0.32.
    f16 (the BF16 weights stored exactly; llama.cpp rounds the activations to f16 for its products) is
    held to 1%.
    """
    folder = wide[family]
    results = {}
    for qtype in ("f32", "f16", "q8_0", "q4_k_m"):
        path = convert_checkpoint(folder, tmp_path / f"{qtype}.gguf", out_type=qtype)
        ids, results[qtype] = llama_logits(path)
    ref = reference(folder, ids, results["f32"].shape[1])
    rel = {q: float(np.sqrt(np.mean((results[q] - ref) ** 2)) / ref.std()) for q in results}
    assert np.abs(results["f32"] - ref).max() < 1e-3
    assert rel["f16"] < 0.01, rel  # BF16 weights fit f16 exactly; llama.cpp rounds activations to f16
    assert rel["q8_0"] < 0.06, rel
    assert rel["q4_k_m"] < 0.45, rel
    assert rel["f32"] < rel["q8_0"] < rel["q4_k_m"], rel  # each step down in bits is visible
    assert np.mean(results["q8_0"].argmax(-1) == ref.argmax(-1)) > 0.9
    types = {t.tensor_type for t in gguf.GGUFReader(tmp_path / "q4_k_m.gguf").tensors if len(t.shape) > 1}
    assert gguf.GGMLQuantizationType.Q4_K in types
    types = {t.tensor_type for t in gguf.GGUFReader(tmp_path / "q8_0.gguf").tensors if len(t.shape) > 1}
    assert types == {gguf.GGMLQuantizationType.Q8_0}


def test_quantize_reports_tensor_progress_and_writes_beside(wide: dict[str, Path], tmp_path: Path) -> None:
    f16 = convert_checkpoint(wide["qwen2"], tmp_path / "m-f16.gguf", out_type="f16")
    seen: list[tuple[str, int, int]] = []
    out = quantize_gguf(f16, tmp_path / "m-q5.gguf", "q5_k_m", threads=1, progress=lambda *a: seen.append(a))
    n_tensors = len(gguf.GGUFReader(f16).tensors)
    assert seen[-1] == ("quantize", n_tensors, n_tensors)
    assert [s[1] for s in seen] == sorted(s[1] for s in seen)
    with LlamaModel(out, n_ctx=64, n_gpu_layers=0) as m:
        assert m.n_vocab > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-f16.gguf", "m-q5.gguf"]


@pytest.mark.slow
def test_every_listed_type_converts(wide: dict[str, Path], tmp_path: Path) -> None:
    f16 = convert_checkpoint(wide["llama3"], tmp_path / "source-f16.gguf", out_type="f16")
    for qtype in CONVERT_TYPES:
        out = quantize_gguf(f16, tmp_path / f"{qtype}.gguf", qtype, threads=1)
        ftype = gguf.GGUFReader(out).fields["general.file_type"].contents()
        assert ftype == gguf.LlamaFileType[{"f32": "ALL_F32"}.get(qtype, "MOSTLY_" + qtype.upper())]


# -- memory: streaming, not loading ---------------------------------------------------------------

PEAK_SCRIPT = """
import sys
from pathlib import Path
from trimix_cpp.convert import convert_checkpoint

def hwm():  # this process's peak resident memory; unlike ru_maxrss it does not inherit the parent's
    return next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))

before = hwm()
convert_checkpoint(Path(sys.argv[1]), Path(sys.argv[2]), out_type=sys.argv[3])
print(before, hwm())
"""


@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("big")
    return tinyckpt.write_checkpoint(root / "big", "llama3", hidden=1024, layers=2, tied=False, extra_rows=46_000)


@pytest.mark.slow
@pytest.mark.parametrize("out_type", ["f16", "q8_0"])
def test_peak_memory_is_a_few_slabs_not_the_model(big_ckpt: Path, tmp_path: Path, out_type: str) -> None:
    """A checkpoint of 200 MB (a 96 MB embedding among its tensors) converts in a few tens of MB above
    the interpreter's own footprint: the converter streams, it never holds a tensor whole."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("peak memory is read from /proc/self/status (Linux)")
    folder = big_ckpt
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    assert size > 190e6
    res = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(folder), str(tmp_path / "out.gguf"), out_type],
        capture_output=True,
        text=True,
        check=True,
    )
    before_kb, after_kb = (int(x) for x in res.stdout.split())
    grown = (after_kb - before_kb) * 1024
    assert grown < 100e6, f"peak RSS grew by {grown / 1e6:.0f} MB converting a {size / 1e6:.0f} MB checkpoint"
    assert (tmp_path / "out.gguf").stat().st_size > size / (2 if out_type == "f16" else 4)


def test_supported_architectures_are_the_papers_families() -> None:
    assert set(SUPPORTED_ARCHITECTURES.values()) == {"qwen2", "llama", "gemma3"}
    assert {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"} <= set(CONVERT_TYPES)


@pytest.mark.slow
def test_no_torch_or_transformers_at_run_time(converted: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    """The conversion (a K-quant, so the quantizer too) runs with torch, transformers and the reference
    tokenizer packages made unimportable: it needs none of them."""
    folder, _ = converted["llama2"]
    code = (
        "import sys\n"
        "for m in ('torch', 'transformers', 'safetensors', 'sentencepiece', 'tokenizers'):\n"
        "    sys.modules[m] = None  # import m now raises ImportError\n"
        "from pathlib import Path\nfrom trimix_cpp.convert import convert_checkpoint\n"
        f"convert_checkpoint(Path({str(folder)!r}), Path({str(tmp_path / 'x.gguf')!r}), out_type='q4_k_m')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "x.gguf").stat().st_size > 0


def test_metadata_is_packed_exactly_as_gguf_writer_packs_it(converted: dict[str, tuple[Path, Path]]) -> None:
    """The converter serializes the metadata section whole (fast for a large vocabulary); it must be the
    bytes the ``gguf`` package's own writer produces, key by key."""
    from trimix_cpp.convert.stream import pack_kv, plan_conversion

    for case in ("qwen2-tied", "llama2", "gemma3"):
        folder, _ = converted[case]
        w = plan_conversion(folder, "q8_0").writer
        theirs = b"".join(
            w._pack_val(k, gguf.GGUFValueType.STRING, add_vtype=False)
            + w._pack_val(v.value, v.type, add_vtype=True, sub_type=v.sub_type)
            for k, v in w.kv_data[0].items()
        )
        assert pack_kv(w.kv_data[0]) == theirs


def test_rope_parameters_of_newer_configs_are_read(tmp_path: Path) -> None:
    """Configs that nest RoPE in ``rope_parameters`` (per layer type for Gemma 3) convert to the same
    file as the flat keys: the same theta, scaling and local base, not the family's defaults."""
    for family, nested in (
        ("qwen2", {"rope_theta": 1000000.0, "rope_type": "default"}),
        (
            "gemma3",
            {
                "full_attention": {"rope_theta": 1000000.0, "rope_type": "linear", "factor": 8.0},
                "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
            },
        ),
    ):
        flat = tinyckpt.write_checkpoint(tmp_path / f"{family}-flat", family, seed=5)
        new = tinyckpt.write_checkpoint(tmp_path / f"{family}-nested", family, seed=5)
        cfg = json.loads((new / "config.json").read_text())
        for key in ("rope_theta", "rope_scaling", "rope_local_base_freq"):
            cfg.pop(key, None)
        cfg["rope_parameters"] = nested
        (new / "config.json").write_text(json.dumps(cfg))
        a = gguf.GGUFReader(convert_checkpoint(flat, tmp_path / f"{family}-flat.gguf"))
        b = gguf.GGUFReader(convert_checkpoint(new, tmp_path / f"{family}-nested.gguf"))
        rope = {k: a.fields[k].contents() for k in a.fields if ".rope." in k}
        assert rope and rope == {k: b.fields[k].contents() for k in b.fields if ".rope." in k}


def test_bf16_to_f16_is_exact_for_every_bit_pattern() -> None:
    """The converter's integer bf16 -> f16 path against widening to float32 and rounding, for all 65,536
    bfloat16 values (zeros, subnormals, the edges of float16's range, infinities, NaN)."""
    from trimix_cpp.convert.checkpoint import bf16_to_f16

    bits = np.arange(65536, dtype=np.uint16)
    with np.errstate(over="ignore"):
        want = (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float16)
    got = bf16_to_f16(bits.copy())
    same = (got.view(np.uint16) == want.view(np.uint16)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), np.flatnonzero(~same)[:10]
