"""Independent reference computations the tests compare the engine against.

Each model runs alone in its own llama.cpp context, one token at a time, and the fused logits are
computed from the method's formula in float64, written out here rather than taken from the library.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from trimix_cpp._llama import LlamaModel

Formula = Callable[[Mapping[str, np.ndarray]], np.ndarray]


def single_logits(path: Path, tokens: list[int] | np.ndarray, n_ctx: int = 512) -> np.ndarray:
    """Last-position logits of one model alone after ``tokens`` (float64 copy)."""
    with LlamaModel(path, n_ctx=n_ctx, n_gpu_layers=0) as m:
        m.decode(np.asarray(tokens, dtype=np.int32))
        return m.logits_row(-1).astype(np.float64)


def reference_greedy(
    paths: Mapping[str, Path],
    prompt_tokens: np.ndarray,
    formula: Formula,
    n_tokens: int,
    banned: np.ndarray | None = None,
    n_ctx: int = 512,
) -> list[int]:
    """Greedy decoding from the formula, each model in its own context."""
    models = {r: LlamaModel(p, n_ctx=n_ctx, n_gpu_layers=0) for r, p in paths.items()}
    try:
        out: list[int] = []
        for m in models.values():
            m.decode(np.asarray(prompt_tokens, dtype=np.int32))
        for _ in range(n_tokens):
            n = min(m.n_vocab for m in models.values())
            rows = {r: m.logits_row(-1)[:n].astype(np.float64) for r, m in models.items()}
            fused = formula(rows)
            if banned is not None:
                fused[banned[:n]] = -np.inf
            tok = int(np.argmax(fused))
            out.append(tok)
            for m in models.values():
                m.decode_one(tok)
        return out
    finally:
        for m in models.values():
            m.close()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x[np.isfinite(x)])
    z = x - m
    return z - np.log(np.sum(np.exp(z)))
