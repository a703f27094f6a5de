"""Fused greedy decoding against the three single models it is made of.

Prints, per model set: each single model's decode time per token (a bare llama.cpp loop:
``llama_decode`` of one token, a zero-copy logits view, argmax), their sum, the fused time per token
through :class:`trimix_cpp.Engine` (three decodes, fusion, UTF-8 guard, sampling, streaming text),
the ratio of the two, and the share of each fused step spent outside ``llama_decode``.

Runs are interleaved (single, single, single, fused, repeat) and the median is reported, because
this is a shared, noisy machine: the ratio measured side by side is the figure that means something.

    python benchmarks/bench_decode.py [--tokens 64] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import trimix_cpp as tm
from trimix_cpp import packaged
from trimix_cpp._llama import LlamaModel

PROMPT = (
    "The river runs through the old town, past the market and the bridge where the fishermen sell their "
    "catch every morning. In the evening the lamps are lit and"
)
ROLES = ("large_ins", "small_cpt", "small_base")


def single_per_token(model: LlamaModel, prompt: np.ndarray, n: int) -> float:
    model.clear()
    model.decode(prompt)
    tok = int(np.argmax(model.logits_row(-1)))
    t0 = time.perf_counter()
    for _ in range(n):
        model.decode_one(tok)
        tok = int(np.argmax(model.logits_row(-1)))
    took = (time.perf_counter() - t0) / n
    model.clear()  # the engine's scheduler owns the sequences: leave none of this loop's cells behind
    return took


def bench(name: str, path, n_tokens: int, repeats: int, threads: int | None) -> dict[str, float]:
    opts = tm.LoadOptions(n_ctx=512, n_threads=threads)
    fusion = tm.plan("trimix", alpha=0.3, beta=0.5)
    singles: dict[str, list[float]] = {r: [] for r in ROLES}
    fused, outside = [], []
    with tm.Engine({r: path for r in ROLES}, opts) as eng:
        prompt = eng.tokenize(PROMPT)
        for _ in range(repeats):
            for r in ROLES:
                singles[r].append(single_per_token(eng.models[r], prompt, n_tokens))
            gen = eng.generate(prompt, fusion, max_tokens=n_tokens).run()
            t = gen.timings
            fused.append(t.gen_s / max(t.gen_tokens, 1))
            outside.append((t.gen_s - t.decode_s) / t.gen_s)
        n_vocab = eng.vocab.n_vocab
    row = {r: statistics.median(v) for r, v in singles.items()}
    row["sum"] = sum(row[r] for r in ROLES)
    row["fused"] = statistics.median(fused)
    row["ratio"] = row["fused"] / row["sum"]
    row["outside"] = statistics.median(outside)
    print(
        f"{name:<28} vocab {n_vocab:>7,} | single ms/tok "
        + " ".join(f"{row[r] * 1e3:6.2f}" for r in ROLES)
        + f" | sum {row['sum'] * 1e3:6.2f} | fused {row['fused'] * 1e3:6.2f} ms/tok"
        + f" | fused/sum {row['ratio']:.3f} | outside llama_decode {row['outside'] * 100:4.1f}%",
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    threads = args.threads or None
    print(f"llama.cpp: {tm._llama.system_info()}")
    bench("Gemma 3 270M Q4_K_M x3", packaged.gemma3_270m_path(), args.tokens, args.repeats, threads)
    bench("SmolLM2-135M-Instruct Q4_1 x3", packaged.smollm2_path(), args.tokens, args.repeats, threads)


if __name__ == "__main__":
    main()
