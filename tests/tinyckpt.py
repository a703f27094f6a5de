"""Tiny Hugging Face checkpoints of the paper's four model families, written by the tests in milliseconds.

Each is a folder as a download leaves it: ``config.json`` with that family's real keys and
conventions, safetensors weights (BF16 like the published checkpoints, or F16/F32; one file or
sharded with its index), and the tokenizer files of the family's tokenizer type: byte-level BPE
``tokenizer.json`` behind Qwen2's or Llama 3's pre-tokenizer, or a SentencePiece-style
``tokenizer.json`` with byte fallback for Llama 2 (adds a leading ``▁``) and Gemma 3 (does not).
Weights are random; the shapes follow the family (grouped-query attention, Qwen2's QKV biases,
Gemma 3's head size that differs from hidden/heads, its extra norms and sliding-window layers,
tied or untied output embeddings, embedding rows beyond the tokenizer's tokens).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
SPIECE = "\u2581"

# A multilingual prompt: the paper's scripts, Chinese, English, code, digits, emoji.
PROMPT = "བོད་ཡིག ئۇيغۇر تىلى Қазақ тілі ᠮᠣᠩᠭᠣᠯ 我想 the quick fox 123 def f(x): 🚀"

FAMILIES = ("qwen2", "llama2", "llama3", "gemma3")


# -- safetensors ---------------------------------------------------------------------------------


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even (how checkpoints are saved)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray], dtype: str = "BF16") -> None:
    """A safetensors file in the format's layout: 8-byte header length, JSON header padded to 8, data."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, x in tensors.items():
        if dtype == "BF16":
            raw = to_bf16_bits(x).tobytes()
        else:
            raw = np.ascontiguousarray(x, dtype={"F16": np.float16, "F32": np.float32}[dtype]).tobytes()
        header[name] = {"dtype": dtype, "shape": list(x.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with path.open("wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for raw in blobs:
            f.write(raw)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as float64 (the reference forward pass reads weights this way)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        raw = data[8 + n + a : 8 + n + b]
        if meta["dtype"] == "BF16":
            x = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            x = np.frombuffer(raw, {"F16": np.float16, "F32": np.float32}[meta["dtype"]])
        out[name] = x.astype(np.float64).reshape(meta["shape"])
    return out


def read_checkpoint(folder: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(read_safetensors(path))
    return out


# -- tokenizers ----------------------------------------------------------------------------------


def byte_chars() -> list[str]:
    """The 256 characters byte-level BPE uses for the bytes 0..255, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def byte_level_tokenizer(regex: str, specials: list[str], ignore_merges: bool) -> tuple[dict[str, Any], int]:
    """A byte-level BPE tokenizer.json (every byte a token, a few merges) and its token count."""
    chars = byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    sp = chars[ord(" ")]
    merges = []
    for left, right in [
        (sp, "t"),
        ("h", "e"),
        (sp + "t", "he"),
        ("i", "n"),
        (sp, "a"),
        ("e", "r"),
        ("o", "n"),
        ("1", "2"),
    ]:
        merges.append([left, right])
        vocab.setdefault(left + right, len(vocab))
    added = [{"id": len(vocab) + i, "content": s, "special": True} for i, s in enumerate(specials)]
    tj = {
        "version": "1.0",
        "added_tokens": [
            {**a, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False} for a in added
        ],
        "normalizer": {"type": "NFC"} if regex == QWEN2_REGEX else None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": ignore_merges,
            "vocab": vocab,
            "merges": merges,
        },
    }
    return tj, len(vocab) + len(specials)


def spm_tokenizer(specials_first: list[str], add_prefix: bool) -> tuple[dict[str, Any], int]:
    """A SentencePiece-style tokenizer.json: special tokens, the 256 byte tokens, pieces and merges."""
    vocab: dict[str, int] = {}
    for s in specials_first:
        vocab[s] = len(vocab)
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in [SPIECE, *"abcdefghijklmnopqrstuvwxyz", *"ཀགབོད་", *"ئايغۇر", *"қазт"]:
        vocab.setdefault(c, len(vocab))
    merges = []
    for left, right in [(SPIECE, "t"), ("h", "e"), (SPIECE + "t", "he"), ("i", "n"), ("ئ", "ۇ"), ("བ", "ོ"), ("қ", "а")]:
        merges.append([left, right])
        vocab.setdefault(left + right, len(vocab))
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPIECE}
    normalizer = (
        {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPIECE}, replace]}
        if add_prefix
        else replace
    )
    unk = "<unk>"
    tj = {
        "version": "1.0",
        "added_tokens": [
            {
                "id": vocab[s],
                "content": s,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for s in specials_first
        ],
        "normalizer": normalizer,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": SPIECE}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": unk,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }
    return tj, len(vocab)


# -- the families ----------------------------------------------------------------------------------


def family_config(family: str, *, hidden: int = 64, layers: int = 2, tied: bool | None = None) -> dict[str, Any]:
    """config.json of a tiny model with the family's real keys (the token counts are filled in later)."""
    if family == "qwen2":
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_size": hidden,
            "intermediate_size": hidden * 3 // 2,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "max_window_layers": layers,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "sliding_window": 32768,
            "use_sliding_window": False,
            "tie_word_embeddings": True if tied is None else tied,
            "torch_dtype": "bfloat16",
            "bos_token_id": None,
            "eos_token_id": None,
        }
    if family == "llama2":
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": hidden * 2 + 32,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "rope_scaling": None,
            "tie_word_embeddings": False if tied is None else tied,
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float16",
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
    if family == "llama3":
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": hidden * 2,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": hidden // 4,
            "hidden_act": "silu",
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            # Llama 3.2's scaling, with a short original context so every band (kept, blended, slowed)
            # occurs among this small head's frequencies
            "rope_scaling": {
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
                "rope_type": "llama3",
            },
            "tie_word_embeddings": True if tied is None else tied,
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "bfloat16",
        }
    if family == "gemma3":
        return {
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "hidden_size": hidden,
            "intermediate_size": hidden * 2,
            "num_hidden_layers": max(layers, 3),
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": hidden // 2,  # larger than hidden/heads, as in Gemma 3 270M
            "query_pre_attn_scalar": hidden // 2,
            "hidden_activation": "gelu_pytorch_tanh",
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention"] + ["sliding_attention"] * (max(layers, 3) - 2),
            "final_logit_softcapping": None,
            "attn_logit_softcapping": None,
            "tie_word_embeddings": True if tied is None else tied,
            "torch_dtype": "bfloat16",
        }
    raise ValueError(family)


def random_weights(cfg: dict[str, Any], n_rows: int, seed: int) -> dict[str, np.ndarray]:
    """HF-named weights for ``cfg``: scaled normal matrices, norms near their identity."""
    rng = np.random.default_rng(seed)
    d = cfg["hidden_size"]
    h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or d // h
    ff = cfg["intermediate_size"]
    gemma = cfg["model_type"].startswith("gemma")

    def m(rows: int, cols: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale / math.sqrt(cols)).astype(np.float32)

    def norm(n: int) -> np.ndarray:  # Gemma stores w for a (1 + w) gain; the others store the gain
        centre = 0.0 if gemma else 1.0
        return (centre + 0.2 * rng.standard_normal(n)).astype(np.float32)

    w = {"model.embed_tokens.weight": (rng.standard_normal((n_rows, d)) * (0.3 if gemma else 1.0)).astype(np.float32)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(d)
        w[p + "self_attn.q_proj.weight"] = m(h * hd, d, 2.0)
        w[p + "self_attn.k_proj.weight"] = m(kv * hd, d, 2.0)
        w[p + "self_attn.v_proj.weight"] = m(kv * hd, d)
        w[p + "self_attn.o_proj.weight"] = m(d, h * hd)
        if cfg["model_type"] == "qwen2":
            w[p + "self_attn.q_proj.bias"] = (0.5 * rng.standard_normal(h * hd)).astype(np.float32)
            w[p + "self_attn.k_proj.bias"] = (0.5 * rng.standard_normal(kv * hd)).astype(np.float32)
            w[p + "self_attn.v_proj.bias"] = (0.5 * rng.standard_normal(kv * hd)).astype(np.float32)
        w[p + "post_attention_layernorm.weight"] = norm(d)
        if gemma:
            w[p + "self_attn.q_norm.weight"] = norm(hd)
            w[p + "self_attn.k_norm.weight"] = norm(hd)
            w[p + "pre_feedforward_layernorm.weight"] = norm(d)
            w[p + "post_feedforward_layernorm.weight"] = norm(d)
        w[p + "mlp.gate_proj.weight"] = m(ff, d)
        w[p + "mlp.up_proj.weight"] = m(ff, d)
        w[p + "mlp.down_proj.weight"] = m(d, ff)
    w["model.norm.weight"] = norm(d)
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = m(n_rows, d, 3.0)
    return w


def write_checkpoint(
    folder: Path,
    family: str,
    *,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    tied: bool | None = None,
    dtype: str | None = None,
    shards: int = 1,
    extra_rows: int | None = None,
) -> Path:
    """Write a tiny checkpoint of ``family`` into ``folder`` (created) and return the folder.

    ``extra_rows`` embedding rows beyond the tokenizer's tokens: by default 17 for Qwen2 (whose
    published embeddings are padded) and 5 for Gemma 3 (whose converter cuts them), 0 otherwise.
    """
    folder.mkdir(parents=True, exist_ok=True)
    cfg = family_config(family, hidden=hidden, layers=layers, tied=tied)
    tok_cfg: dict[str, Any]
    if family == "qwen2":
        tj, n_tokens = byte_level_tokenizer(QWEN2_REGEX, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], False)
        eos = "<|im_end|>"
        tok_cfg = {
            "bos_token": None,
            "eos_token": eos,
            "pad_token": "<|endoftext|>",
            "add_bos_token": False,
            "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        }
        cfg["eos_token_id"] = n_tokens - 1
    elif family == "llama3":
        tj, n_tokens = byte_level_tokenizer(LLAMA3_REGEX, ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"], True)
        tok_cfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "add_bos_token": True}
        cfg["bos_token_id"], cfg["eos_token_id"] = n_tokens - 3, n_tokens - 1
    elif family == "llama2":
        tj, n_tokens = spm_tokenizer(["<unk>", "<s>", "</s>"], add_prefix=True)
        tok_cfg = {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "add_bos_token": True,
            "add_eos_token": False,
        }
    else:
        tj, n_tokens = spm_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>"], add_prefix=False)
        tok_cfg = {
            "bos_token": "<bos>",
            "eos_token": "<eos>",
            "pad_token": "<pad>",
            "unk_token": "<unk>",
            "add_bos_token": True,
            "add_eos_token": False,
        }
        cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"] = 2, 1, 0
    if extra_rows is None:
        extra_rows = {"qwen2": 17, "gemma3": 5}.get(family, 0)
    cfg["vocab_size"] = n_tokens + extra_rows
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, ensure_ascii=False))
    weights = random_weights(cfg, cfg["vocab_size"], seed)
    dtype = dtype or {"llama2": "F16"}.get(family, "BF16")
    names = list(weights)
    if shards == 1:
        write_safetensors(folder / "model.safetensors", weights, dtype)
    else:
        weight_map = {}
        for s in range(shards):
            part = names[s::shards]
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            write_safetensors(folder / fname, {n: weights[n] for n in part}, dtype)
            weight_map.update({n: fname for n in part})
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder
