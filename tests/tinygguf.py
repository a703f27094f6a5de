"""Tiny llama-architecture GGUF models written by the test suite itself, in milliseconds.

Real llama.cpp loads and runs them, so every test that uses them exercises the same code path as a
published model. The vocabulary is SentencePiece-style with byte fallback: ``<unk>``, ``<s>``,
``</s>``, the 256 byte tokens ``<0x00>``..``<0xFF>``, ASCII pieces and merges, and a few whole
Tibetan and Uyghur characters, so text in those scripts tokenizes into a mix of character tokens and
byte tokens that each carry part of a character.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

ASCII = [chr(c) for c in range(0x21, 0x7F)]
MERGES = ["▁t", "th", "he", "▁the", "in", "an", "er", "▁a", "on", "▁of", "▁and", "ing", "▁to", "es", "re"]
NONLATIN = ["ཀ", "ག", "་", "བ", "ོ", "ད", "ئ", "ا", "ۇ", "ي", "غ", "ۇر"]

TOKEN_TYPE_NORMAL, TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL = 1, 2, 3
TOKEN_TYPE_UNUSED, TOKEN_TYPE_BYTE = 5, 6


def vocabulary(n_pad: int = 0, swap: tuple[int, int] | None = None) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types; ``n_pad`` unused padding entries go at the end; ``swap``
    exchanges two pieces (a vocabulary that looks alike but does not fuse)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_CONTROL] + [TOKEN_TYPE_BYTE] * 256
    scores = [0.0, 0.0, 0.0] + [0.0] * 256
    pieces = ["▁", *ASCII, *MERGES, *NONLATIN]
    for i, p in enumerate(pieces):
        tokens.append(p)
        types.append(TOKEN_TYPE_NORMAL)
        scores.append(-float(i) if len(p) == 1 else float(len(p)) - i * 1e-3)
    for _ in range(n_pad):
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(TOKEN_TYPE_UNUSED)
        scores.append(-1e4)
    if swap is not None:
        a, b = swap
        tokens[a], tokens[b] = tokens[b], tokens[a]
    return tokens, scores, types


def write_tiny_llama(
    path: Path,
    seed: int = 0,
    *,
    n_embd: int = 32,
    n_layer: int = 2,
    n_head: int = 4,
    n_ff: int = 64,
    n_ctx: int = 512,
    n_pad: int = 0,
    swap: tuple[int, int] | None = None,
    logit_scale: float = 1.0,
) -> Path:
    """Write a random llama model to ``path``; different seeds give different models."""
    tokens, scores, types = vocabulary(n_pad, swap)
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"tiny-llama-{seed}")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    def t(*shape: int, scale: float) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w.add_tensor("token_embd.weight", t(n_vocab, n_embd, scale=1.0))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", t(n_embd, n_embd, scale=n_embd**-0.5))
        w.add_tensor(f"blk.{i}.attn_k.weight", t(n_embd, n_embd, scale=n_embd**-0.5))
        w.add_tensor(f"blk.{i}.attn_v.weight", t(n_embd, n_embd, scale=n_embd**-0.5))
        w.add_tensor(f"blk.{i}.attn_output.weight", t(n_embd, n_embd, scale=n_embd**-0.5))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", t(n_ff, n_embd, scale=n_embd**-0.5))
        w.add_tensor(f"blk.{i}.ffn_up.weight", t(n_ff, n_embd, scale=n_embd**-0.5))
        w.add_tensor(f"blk.{i}.ffn_down.weight", t(n_embd, n_ff, scale=n_ff**-0.5))
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    w.add_tensor("output.weight", t(n_vocab, n_embd, scale=logit_scale * n_embd**-0.5 * 3.0))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
