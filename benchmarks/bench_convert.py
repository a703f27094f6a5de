"""What converting a checkpoint costs: throughput against a plain copy, and peak memory.

Writes a synthetic checkpoint of Qwen2.5-1.5B's shape (28 layers, hidden 1,536, 12 query and 2 KV
heads, MLP 8,960, 151,936 embedding rows, tied; random BF16 weights, about 3.1 GB in two shards with
an index, and a byte-level tokenizer), then, each step in a fresh process so each has its own peak
resident memory:

* ``copy``: the checkpoint's bytes copied file to file (the floor a disk-bound converter can reach);
* ``convert f16`` and ``convert q8_0``: ``trimix_cpp.convert.convert_checkpoint``;
* ``quantize q4_k_m``: the f16 GGUF through llama.cpp's quantizer (its child process included).

For each: seconds, MB/s of checkpoint (or input GGUF) bytes, peak RSS, and for the conversions the
ratio of their time to the copy's. Targets: conversion peak RSS <= 1.5 GB; conversion time within 2x
of the copy. Run once on a quiet machine; ``--layers``/``--hidden``/``--vocab`` shrink the shape to
check the script itself in seconds.

    python benchmarks/bench_convert.py [--dir /big/scratch] [--layers 28] [--hidden 1536] [--ff 8960]
        [--vocab 151936] [--keep] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tinyckpt import QWEN2_REGEX, byte_level_tokenizer  # the tests' tokenizer builder

STEP = """
import json, resource, sys, time
from pathlib import Path
kind, a, b = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
t0 = time.perf_counter()
if kind == "copy":
    b.mkdir()
    for f in sorted(a.glob("*.safetensors")):
        with f.open("rb") as src, (b / f.name).open("wb") as dst:
            while chunk := src.read(16 << 20):
                dst.write(chunk)
else:
    from trimix_cpp.convert import convert_checkpoint, quantize_gguf
    if kind.startswith("convert"):
        convert_checkpoint(a, b, out_type=kind.split(":")[1])
    else:
        quantize_gguf(a, b, kind.split(":")[1])
dt = time.perf_counter() - t0
rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"seconds": dt, "peak_rss_bytes": rss * 1024}))
"""


def shapes(layers: int, hidden: int, ff: int, vocab: int, heads: int, kv: int) -> dict[str, tuple[int, ...]]:
    hd = hidden // heads
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (heads * hd, hidden),
            p + "self_attn.q_proj.bias": (heads * hd,),
            p + "self_attn.k_proj.weight": (kv * hd, hidden),
            p + "self_attn.k_proj.bias": (kv * hd,),
            p + "self_attn.v_proj.weight": (kv * hd, hidden),
            p + "self_attn.v_proj.bias": (kv * hd,),
            p + "self_attn.o_proj.weight": (hidden, heads * hd),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (ff, hidden),
            p + "mlp.up_proj.weight": (ff, hidden),
            p + "mlp.down_proj.weight": (hidden, ff),
        }
    out["model.norm.weight"] = (hidden,)
    return out


def write_shard(path: Path, tensors: dict[str, tuple[int, ...]], rng: np.random.Generator) -> None:
    """A BF16 safetensors file written tensor by tensor (the header first, from the shapes)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors.items():
        n = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with path.open("wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for shape in tensors.values():
            rows = shape[0] if len(shape) > 1 else 1
            cols = math.prod(shape) // rows
            step = max(1, (8 << 20) // cols)
            for r in range(0, rows, step):
                x = rng.standard_normal((min(step, rows - r), cols), dtype=np.float32) * 0.02
                f.write((x.view(np.uint32) >> 16).astype(np.uint16).tobytes())


def write_checkpoint(folder: Path, args: argparse.Namespace) -> int:
    folder.mkdir(parents=True)
    tj, n_tokens = byte_level_tokenizer(QWEN2_REGEX, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], False)
    vocab = max(args.vocab, n_tokens)
    cfg = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": args.hidden,
        "intermediate_size": args.ff,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "use_sliding_window": False,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "vocab_size": vocab,
    }
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": None}))
    all_shapes = shapes(args.layers, args.hidden, args.ff, vocab, args.heads, args.kv_heads)
    names = list(all_shapes)
    half = len(names) // 2
    rng = np.random.default_rng(0)
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        write_shard(folder / fname, {n: all_shapes[n] for n in part}, rng)
        weight_map |= dict.fromkeys(part, fname)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def run_step(kind: str, a: Path, b: Path) -> dict[str, float]:
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    res = subprocess.run([sys.executable, "-c", STEP, kind, str(a), str(b)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{kind} failed: {res.stderr.strip()}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None, help="Scratch folder (needs about 4x the checkpoint size).")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--ff", type=int, default=8960)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="Keep the scratch folder.")
    ap.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.dir))
    try:
        ckpt = root / "ckpt"
        t0 = time.perf_counter()
        size = write_checkpoint(ckpt, args)
        made = time.perf_counter() - t0
        results = {}
        steps = [
            ("copy", ckpt, root / "copy", size),
            ("convert:f16", ckpt, root / "f16.gguf", size),
            ("convert:q8_0", ckpt, root / "q8_0.gguf", size),
        ]
        for kind, a, b, n in steps:
            results[kind] = {**run_step(kind, a, b), "bytes_in": n}
        f16 = root / "f16.gguf"
        results["quantize:q4_k_m"] = {
            **run_step("quantize:q4_k_m", f16, root / "q4.gguf"),
            "bytes_in": f16.stat().st_size,
        }
        copy_s = results["copy"]["seconds"]
        for r in results.values():
            r["mb_per_s"] = r["bytes_in"] / r["seconds"] / 1e6
            r["x_copy"] = r["seconds"] / copy_s
        report = {
            "shape": {k: getattr(args, k) for k in ("layers", "hidden", "ff", "vocab", "heads", "kv_heads")},
            "checkpoint_bytes": size,
            "checkpoint_write_s": made,
            "steps": results,
            "targets": {
                "convert_peak_rss_le_1.5GB": all(
                    results[k]["peak_rss_bytes"] <= 1.5e9 for k in ("convert:f16", "convert:q8_0")
                ),
                "convert_f16_within_2x_copy": results["convert:f16"]["x_copy"] <= 2.0,
            },
            "cpu_count": os.cpu_count(),
        }
        if args.json:
            print(json.dumps(report))
            return
        print(
            f"checkpoint: {size / 1e9:.2f} GB BF16 ({args.layers} layers, hidden {args.hidden}), "
            f"written in {made:.0f} s"
        )
        print(f"{'step':<17}{'seconds':>9}{'MB/s':>9}{'x copy':>8}{'peak RSS':>11}")
        for kind, r in results.items():
            print(
                f"{kind:<17}{r['seconds']:>9.2f}{r['mb_per_s']:>9.0f}{r['x_copy']:>8.2f}"
                f"{r['peak_rss_bytes'] / 2**20:>8.0f} MiB"
            )
        for name, ok in report["targets"].items():
            print(f"target {name}: {'met' if ok else 'NOT met'}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
