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
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_synthetic
from make_synthetic import QWEN25_1_5B

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
try:  # VmHWM: this process's own peak (ru_maxrss would start from the parent's, inherited across exec)
    own = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
except OSError:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
# the quantizer's child process, forked from this small one
rss = max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"seconds": dt, "peak_rss_bytes": rss * 1024}))
"""


def write_checkpoint(folder: Path, args: argparse.Namespace) -> int:
    """Qwen2.5-1.5B's shape (or the one the flags shrink it to), written as make_synthetic.py writes it."""
    shape = {
        **QWEN25_1_5B,
        "hidden_size": args.hidden,
        "intermediate_size": args.ff,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "vocab_size": args.vocab,
    }
    return make_synthetic.write_checkpoint(folder, make_synthetic.qwen2_config(shape))


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
