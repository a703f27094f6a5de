"""Random-weight models of the paper's real sizes, for measuring speed where no checkpoint can be downloaded.

Speed does not depend on the values of the weights, only on their shapes and types, so a checkpoint
with the real configuration of a published model and random weights runs exactly as fast as the
model itself. This script writes such checkpoints (BF16 safetensors as published, sharded with an
index, a byte-level BPE tokenizer behind Qwen2's pre-tokenizer whose unused ids pad the vocabulary to
the embedding's rows as in the real files) and converts each with ``trimix models convert``:

* ``large_ins``: Qwen2.5-7B-Instruct's shape (28 layers, hidden 3,584, 28 query / 4 KV heads, MLP
  18,944, 152,064 embedding rows, untied output, QKV biases), to ``q4_k_m``;
* ``small_cpt`` and ``small_base``: Qwen2.5-1.5B's shape (28 layers, hidden 1,536, 12 / 2 heads,
  MLP 8,960, 151,936 rows, tied), two different random draws, to ``q8_0``.

The three share one tokenizer, so trimix fuses them as it fuses the real trio. Each checkpoint is
deleted once converted; a GGUF already there is kept (rerunning resumes). Disk: about 35 GB free
while the 7B converts (its BF16 checkpoint, the f16 intermediate and the q4_k_m file).

    python benchmarks/make_synthetic.py --out DIR [--only large_ins,small_cpt,small_base]

The shapes also serve ``bench_convert.py`` (Qwen2.5-1.5B's shape written the same way).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tinyckpt import QWEN2_REGEX, byte_level_tokenizer  # the tests' tokenizer builder

# The published config.json values that shape the computation (Qwen2.5-7B-Instruct, Qwen2.5-1.5B).
QWEN25_7B_INSTRUCT: dict[str, Any] = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
    "max_position_embeddings": 32768,
}
QWEN25_1_5B: dict[str, Any] = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 131072,
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# role -> (source name, shape, GGUF type, random seed)
TRIO: dict[str, tuple[str, dict[str, Any], str, int]] = {
    "large_ins": ("Qwen2.5-7B-Instruct", QWEN25_7B_INSTRUCT, "q4_k_m", 7),
    "small_cpt": ("Qwen2.5-1.5B-cpt", QWEN25_1_5B, "q8_0", 1),
    "small_base": ("Qwen2.5-1.5B", QWEN25_1_5B, "q8_0", 2),
}


def qwen2_config(shape: dict[str, Any]) -> dict[str, Any]:
    """A complete Qwen2 config.json around ``shape``."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "use_sliding_window": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        **shape,
    }


def tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Qwen2 checkpoint with configuration ``cfg``, in the order the files hold them."""
    hidden, ff, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = hidden // heads
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(cfg["num_hidden_layers"]):
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
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = (vocab, hidden)
    return out


def write_shard(path: Path, tensors: dict[str, tuple[int, ...]], rng: np.random.Generator) -> None:
    """A BF16 safetensors file written tensor by tensor, a few MiB at a time (the header first, from the shapes)."""
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


def write_checkpoint(folder: Path, cfg: dict[str, Any], *, seed: int = 0, shards: int = 2) -> int:
    """A Qwen2 checkpoint folder with random weights; returns the bytes of its safetensors."""
    folder.mkdir(parents=True)
    tj, n_tokens = byte_level_tokenizer(QWEN2_REGEX, SPECIALS, False)
    cfg = {**cfg, "vocab_size": max(cfg["vocab_size"], n_tokens)}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": None}))
    shapes = tensor_shapes(cfg)
    names = list(shapes)
    per = math.ceil(len(names) / shards)
    rng = np.random.default_rng(seed)
    weight_map = {}
    for i in range(shards):
        part = names[i * per : (i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_shard(folder / fname, {n: shapes[n] for n in part}, rng)
        weight_map |= dict.fromkeys(part, fname)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def gguf_name(role: str) -> str:
    source, _, out_type, _ = TRIO[role]
    return f"{source.lower()}-synthetic.{out_type}.gguf"


def make(out: Path, role: str) -> Path:
    """The GGUF of ``role`` in ``out``, written (checkpoint, then ``trimix models convert``) unless present."""
    source, shape, out_type, seed = TRIO[role]
    target = out / gguf_name(role)
    if target.exists():
        print(f"{role}: {target} exists, kept")
        return target
    ckpt = out / f"ckpt-{role}"
    shutil.rmtree(ckpt, ignore_errors=True)
    t0 = time.perf_counter()
    size = write_checkpoint(ckpt, qwen2_config(shape), seed=seed, shards=4 if shape is QWEN25_7B_INSTRUCT else 2)
    print(f"{role}: {source} checkpoint, {size / 1e9:.2f} GB BF16, written in {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "trimix_cli.main", "models", "convert", str(ckpt), "-o", str(target)]
    subprocess.run([*cmd, "--type", out_type], check=True)
    print(f"{role}: converted to {out_type} in {time.perf_counter() - t0:.0f} s: {target.stat().st_size / 1e9:.2f} GB")
    shutil.rmtree(ckpt)
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="Folder for the three GGUF files.")
    ap.add_argument("--only", default=",".join(TRIO), help="Roles to make, comma-separated.")
    args = ap.parse_args()
    roles = [r for r in args.only.split(",") if r]
    unknown = [r for r in roles if r not in TRIO]
    if unknown:
        raise SystemExit(f"unknown role {unknown[0]!r}: use {', '.join(TRIO)}")
    args.out.mkdir(parents=True, exist_ok=True)
    for role in roles:
        make(args.out, role)
    print(" ".join(f"--{r.replace('_', '-')} {args.out / gguf_name(r)}" for r in roles))


if __name__ == "__main__":
    main()
