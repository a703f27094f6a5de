"""An independent float64 forward pass of a checkpoint, in the checkpoint's own conventions.

It reads the safetensors and config.json directly (its own reader, not the converter's) and
computes what the original model computes: RoPE by rotating the two *halves* of each head (so
llama.cpp's adjacent-pair layout after the converter's Q/K permutation is checked, not assumed),
Llama 3's frequency scaling as the original code writes it (not as a table of divisors), Gemma's
``(1 + w)`` norms, its Q/K norms, post-attention and post-MLP norms, its embedding scale, its
sliding-window layers with their own RoPE base, and grouped-query attention by repeating KV heads.
Comparing llama.cpp's logits on the converted GGUF with these is the proof that the conversion
means the same model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from tinyckpt import read_checkpoint


def _inv_freq(head_dim: int, base: float, scaling: dict[str, Any] | None) -> np.ndarray:
    inv = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled)
    raise ValueError(kind)


def _rope(x: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """x: (T, heads, head_dim); rotate halves, as the original models do."""
    t = np.arange(x.shape[0], dtype=np.float64)[:, None] * inv[None, :]
    cos = np.concatenate([np.cos(t), np.cos(t)], -1)[:, None, :]
    sin = np.concatenate([np.sin(t), np.sin(t)], -1)[:, None, :]
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _gelu_ggml(x: np.ndarray) -> np.ndarray:
    """GELU as ggml's CPU kernel computes it: looked up in a table indexed by the input rounded to f16,
    holding f16 values (exact for |x| >= 10). A property of llama.cpp's runtime, not of the weights."""
    x16 = x.astype(np.float16).astype(np.float64)
    y = _gelu_tanh(x16).astype(np.float16).astype(np.float64)
    return np.where(x <= -10, 0.0, np.where(x >= 10, x, y))


def forward(folder: Path, ids: list[int] | np.ndarray, *, ggml_gelu: bool = False) -> np.ndarray:
    """Logits (positions x embedding rows) of the checkpoint in ``folder`` for token ``ids``.

    ``ggml_gelu`` computes Gemma's GELU through ggml's f16 table instead of exactly.
    """
    cfg = json.loads((folder / "config.json").read_text())
    if "text_config" in cfg:
        cfg = {**cfg, **cfg["text_config"]}
    w = {k.replace("language_model.", ""): v for k, v in read_checkpoint(folder).items()}
    gemma = cfg["model_type"].startswith("gemma")
    d, n_head = cfg["hidden_size"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads", n_head)
    hd = cfg.get("head_dim") or d // n_head
    eps = cfg["rms_norm_eps"]
    ids = np.asarray(ids)
    n = len(ids)

    def rms(x: np.ndarray, g: np.ndarray) -> np.ndarray:
        y = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)
        return y * (1.0 + g) if gemma else y * g

    x = w["model.embed_tokens.weight"][ids]
    if gemma:
        x = x * math.sqrt(d)
    scale = (cfg.get("query_pre_attn_scalar", hd) if gemma else hd) ** -0.5
    layer_types = cfg.get("layer_types") or ["full_attention"] * cfg["num_hidden_layers"]
    causal = np.tril(np.ones((n, n), bool))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sliding = gemma and layer_types[i] == "sliding_attention"
        if sliding:
            inv = _inv_freq(hd, cfg["rope_local_base_freq"], None)
        else:
            inv = _inv_freq(hd, cfg.get("rope_theta", 10000.0), cfg.get("rope_scaling"))
        h = rms(x, w[p + "input_layernorm.weight"])

        def proj(name: str, h: np.ndarray = h, p: str = p) -> np.ndarray:
            y = h @ w[p + f"self_attn.{name}.weight"].T
            return y + w[p + f"self_attn.{name}.bias"] if p + f"self_attn.{name}.bias" in w else y

        q = proj("q_proj").reshape(n, n_head, hd)
        k = proj("k_proj").reshape(n, n_kv, hd)
        v = proj("v_proj").reshape(n, n_kv, hd)
        if gemma:
            q = rms(q, w[p + "self_attn.q_norm.weight"])
            k = rms(k, w[p + "self_attn.k_norm.weight"])
        q, k = _rope(q, inv), _rope(k, inv)
        group = n_head // n_kv
        k = np.repeat(k, group, axis=1)
        v = np.repeat(v, group, axis=1)
        att = np.einsum("qhd,khd->hqk", q, k) * scale
        mask = causal.copy()
        if sliding:
            pos = np.arange(n)
            mask &= (pos[:, None] - pos[None, :]) < cfg["sliding_window"]
        att = np.where(mask[None], att, -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        out = np.einsum("hqk,khd->qhd", att, v).reshape(n, n_head * hd) @ w[p + "self_attn.o_proj.weight"].T
        if gemma:
            out = rms(out, w[p + "post_attention_layernorm.weight"])
            x = x + out
            h = rms(x, w[p + "pre_feedforward_layernorm.weight"])
        else:
            x = x + out
            h = rms(x, w[p + "post_attention_layernorm.weight"])
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        act = (_gelu_ggml(gate) if ggml_gelu else _gelu_tanh(gate)) if gemma else gate / (1 + np.exp(-gate))
        ff = (act * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        if gemma:
            ff = rms(ff, w[p + "post_feedforward_layernorm.weight"])
        x = x + ff
    x = rms(x, w["model.norm.weight"])
    head = w.get("lm_head.weight") if not cfg.get("tie_word_embeddings", gemma) else None
    logits = x @ (w["model.embed_tokens.weight"] if head is None else head).T
    if cfg.get("final_logit_softcapping"):
        cap = cfg["final_logit_softcapping"]
        logits = np.tanh(logits / cap) * cap
    return logits
