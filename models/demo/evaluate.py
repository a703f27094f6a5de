"""Held-out perplexity through llama.cpp, and the torch-versus-llama.cpp logits check.

Perplexity is measured on the exported GGUF files themselves (what the fusion code will
load), per SmolLM2 token: the three demo models share one vocabulary, so their per-token
figures are directly comparable.  Each held-out string is scored on its own, after the
document separator, exactly as :func:`common.scoring_windows` lays it out.

Run on its own to score any GGUF file::

    python models/demo/evaluate.py models/demo/small-cpt.gguf --text models/demo/data/ug_heldout.txt
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import llama_cpp
import numpy as np
import torch
from common import Tokenizer, read_lines, scoring_windows
from model import TinyLlama


def token_nll(logits: np.ndarray, targets: list[int]) -> float:
    """Summed negative log-likelihood of ``targets`` under rows of ``logits``.

    The exponentials are summed in float64: a 49,152-wide softmax row loses precision in
    a float32 sum.
    """
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=-1, dtype=np.float64))
    return float((log_z - shifted[np.arange(len(targets)), targets]).sum())


def load_gguf(path: Path, n_ctx: int, f32_cache: bool = False) -> llama_cpp.Llama:
    """A llama.cpp context that keeps the logits of every position.

    llama.cpp stores its KV cache in F16 by default; ``f32_cache`` keeps it in F32, which
    isolates the file's own rounding from the cache's in the logits check.

    One thread: these sequences are short, and on a 2-core machine llama.cpp's spinning
    thread barrier made a 2-thread decode 4 to 18 times slower whenever another process
    was busy on the other core.
    """
    cache_type = llama_cpp.GGML_TYPE_F32 if f32_cache else llama_cpp.GGML_TYPE_F16
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        n_threads=1,
        n_threads_batch=1,
        logits_all=True,
        type_k=cache_type,
        type_v=cache_type,
        verbose=False,
    )


def gguf_logits(llm: llama_cpp.Llama, ids: list[int]) -> np.ndarray:
    """Logits ``(len(ids), vocab)`` of one fresh sequence."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def gguf_perplexity(path: Path, texts: list[str], tok: Tokenizer, window: int) -> dict[str, float]:
    """Per-token perplexity of ``texts`` under the GGUF model at ``path``."""
    llm = load_gguf(path, n_ctx=window)
    nll, count = 0.0, 0
    for text in texts:
        for ids in scoring_windows(tok.encode(text), window):
            nll += token_nll(gguf_logits(llm, ids[:-1]), ids[1:])
            count += len(ids) - 1
    return {"ppl": math.exp(nll / count), "nll_per_token": nll / count, "tokens": count}


@torch.no_grad()
def torch_perplexity(model: TinyLlama, texts: list[str], tok: Tokenizer, window: int) -> dict[str, float]:
    """The same measure in torch (float32), as a cross-check of the export."""
    model.eval()
    nll, count = 0.0, 0
    for text in texts:
        for ids in scoring_windows(tok.encode(text), window):
            x = torch.tensor([ids])
            logp = torch.log_softmax(model(x[:, :-1]).double(), dim=-1)
            nll -= float(logp[0].gather(-1, x[0, 1:, None]).sum())
            count += len(ids) - 1
    return {"ppl": math.exp(nll / count), "nll_per_token": nll / count, "tokens": count}


@torch.no_grad()
def logits_check(model: TinyLlama, path: Path, ids: list[int]) -> dict[str, float]:
    """Compare llama.cpp's logits of ``ids`` with the torch float32 forward.

    A wrong RoPE pairing, a transposed matrix or a missed tie would show up here as
    differences of order one or more, not of the order of the storage rounding.  The
    check is run twice: with llama.cpp's default F16 KV cache (what inference uses) and
    with an F32 cache (only the file's own weight precision remains).
    """
    model.eval()
    reference = model(torch.tensor([ids]))[0].numpy()
    result: dict[str, float] = {
        "tokens": len(ids),
        "logit_range": float(reference.max() - reference.min()),
    }
    for label, f32_cache in (("f16_cache", False), ("f32_cache", True)):
        got = gguf_logits(load_gguf(path, n_ctx=max(64, len(ids)), f32_cache=f32_cache), ids)
        diff = np.abs(got - reference)
        result[f"max_abs_diff_{label}"] = float(diff.max())
        result[f"mean_abs_diff_{label}"] = float(diff.mean())
        result[f"argmax_agreement_{label}"] = float((got.argmax(-1) == reference.argmax(-1)).mean())
    return result


def main() -> None:
    """Print the held-out perplexity of GGUF files."""
    parser = argparse.ArgumentParser(description="held-out perplexity of GGUF models")
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--text", type=Path, required=True, help="one string per line")
    parser.add_argument("--window", type=int, default=512)
    args = parser.parse_args()
    tok = Tokenizer()
    texts = read_lines(args.text)
    for path in args.models:
        result = gguf_perplexity(path, texts, tok, args.window)
        print(f"{path.name}: ppl {result['ppl']:.2f} over {result['tokens']} tokens")


if __name__ == "__main__":
    main()
