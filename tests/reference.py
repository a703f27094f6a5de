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
    process: Callable[[np.ndarray, list[int]], np.ndarray] | None = None,
) -> list[int]:
    """Greedy decoding from the formula, each model in its own context. ``process(fused, history)``
    may change the fused logits (history: the prompt and the tokens picked so far)."""
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
            if process is not None:
                fused = process(fused, [*np.asarray(prompt_tokens).tolist(), *out])
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


def llama_penalties(
    logits: np.ndarray, history: list[int], last_n: int, repeat: float, freq: float, present: float
) -> np.ndarray:
    """The logits after llama.cpp's own penalties sampler has seen ``history`` (dense, float32)."""
    import ctypes

    import llama_cpp as lc

    n = len(logits)
    data = (lc.llama_token_data * n)()
    for i, x in enumerate(np.asarray(logits, dtype=np.float32).tolist()):
        data[i].id, data[i].logit, data[i].p = i, x, 0.0
    arr = lc.llama_token_data_array(data, n, -1, False)
    smpl = lc.llama_sampler_init_penalties(n, last_n, repeat, freq, present)
    try:
        for t in history:
            lc.llama_sampler_accept(smpl, t)
        lc.llama_sampler_apply(smpl, ctypes.byref(arr))
    finally:
        lc.llama_sampler_free(smpl)
    out = np.empty(n, dtype=np.float32)
    for i in range(arr.size):
        out[arr.data[i].id] = arr.data[i].logit
    return out


def llama_sampler_probs(
    logits: np.ndarray,
    top_k: int,
    top_p: float,
    min_p: float,
    temperature: float,
    penalties: tuple[list[int], int, float, float, float] | None = None,
) -> np.ndarray:
    """The distribution llama.cpp's own sampler chain (penalties, top-k, top-p, min-p, temperature,
    in llama.cpp's default order) leaves for the final draw, as a dense vector over the vocabulary.
    ``penalties``: (history, last_n, repeat, freq, present)."""
    import ctypes

    import llama_cpp as lc

    n = len(logits)
    data = (lc.llama_token_data * n)()
    for i, x in enumerate(np.asarray(logits, dtype=np.float32).tolist()):
        data[i].id, data[i].logit, data[i].p = i, x, 0.0
    arr = lc.llama_token_data_array(data, n, -1, False)
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    try:
        if penalties is not None:
            history, last_n, repeat, freq, present = penalties
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_penalties(n, last_n, repeat, freq, present))
            for t in history:
                lc.llama_sampler_accept(chain, t)
        if top_k > 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(top_k))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(top_p, 1))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_min_p(min_p, 1))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(temperature))
        lc.llama_sampler_apply(chain, ctypes.byref(arr))
    finally:
        lc.llama_sampler_free(chain)
    ids = np.array([arr.data[i].id for i in range(arr.size)])
    kept = np.array([arr.data[i].logit for i in range(arr.size)], dtype=np.float64)
    out = np.zeros(n)
    out[ids] = np.exp(kept - kept.max())
    return out / out.sum()
