"""Speculative fused decoding against plain fused decoding and against the large model alone.

On the demo trio (SmolLM2-135M-Instruct as large-ins, two 15.6M llama models as small-cpt and
small-base), for Uyghur and English prompts and two weightings (the pair perplexity selection picks
on the prompt, and alpha = 0.3, beta = 0.7), prints generated tokens per second with ``--draft``
0, 2, 4, 6 and 8, the share of drafted tokens accepted, and the speed-up over plain fused decoding
(``--draft 0``) and over the large model decoding alone (the same engine, ``--method single``).
Greedy first, then sampling at T = 0.7. Every configuration of a prompt runs once per repeat, in
turn, in one process, and the median of the repeats is printed: on a shared machine only figures
measured side by side compare. Greedy outputs are checked to be identical to ``--draft 0``.
Last, what verification costs: one batch of n tokens through each model against one token
(drafting pays only as far as a batch costs less than its tokens one by one).

    python benchmarks/bench_speculative.py [--tokens 64] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import trimix_cpp as tm
from trimix_cpp import _llama, packaged, speculative
from trimix_cpp.profiles import find_profile

PROMPTS = {
    "uig": "ئالاقەداشنى ئۆچۈرۈش مەغلۇپ بولدى، ھۆججەتنى ساقلاش",
    "eng": "The river runs through the old town, past the market and the bridge where the fishermen sell",
}
DRAFTS = (0, 2, 4, 6, 8)


def measure(eng: tm.Engine, prompt: str, fusion, draft: int, n: int, sampling: tm.SamplingParams):
    gen = eng.generate(prompt, fusion, sampling=sampling, max_tokens=n, draft=draft).run()
    t = gen.timings
    return t.gen_tokens / t.gen_s if t.gen_s else 0.0, t.draft_tokens, t.accepted_tokens, gen.token_ids


def run(eng: tm.Engine, n: int, repeats: int, sampling: tm.SamplingParams, title: str) -> None:
    print(f"\n## {title}")
    print("| prompt | weights | draft | tok/s | accepted | vs plain fused | vs large alone |")
    print("|---|---|---|---|---|---|---|")
    for lang, prompt in PROMPTS.items():
        sel = eng.select(prompt, tm.Selector("ppl"))
        weightings = {
            f"ppl ({sel.chosen[0]:g}, {sel.chosen[1]:g})": tm.plan("trimix", alpha=sel.chosen[0], beta=sel.chosen[1]),
            "(0.3, 0.7)": tm.plan("trimix", alpha=0.3, beta=0.7),
        }
        for label, fusion in weightings.items():
            speed: dict[object, list[float]] = {d: [] for d in (*DRAFTS, "large")}
            drafted = {d: 0 for d in DRAFTS}
            accepted = {d: 0 for d in DRAFTS}
            reference = None
            for _ in range(repeats):
                tps, _, _, _ = measure(eng, prompt, tm.plan("single"), 0, n, sampling)
                speed["large"].append(tps)
                for d in DRAFTS:
                    tps, dr, ac, ids = measure(eng, prompt, fusion, d, n, sampling)
                    speed[d].append(tps)
                    drafted[d] += dr
                    accepted[d] += ac
                    if sampling.greedy:
                        if d == 0:
                            reference = ids
                        elif ids != reference:
                            print(f"  note: draft {d} differs from draft 0 on {lang} {label} (batch-layout noise?)")
            med = {k: statistics.median(v) for k, v in speed.items()}
            for d in DRAFTS:
                rate = f"{accepted[d] / drafted[d]:.0%}" if drafted[d] else "-"
                print(
                    f"| {lang} | {label} | {d} | {med[d]:.1f} | {rate} | {med[d] / med[0]:.2f}x | "
                    f"{med[d] / med['large']:.2f}x |"
                )
            print(f"| {lang} | large-ins alone | - | {med['large']:.1f} | - | - | 1.00x |")


def batch_cost(paths: dict[str, object], threads: int | None, repeats: int = 15) -> None:
    """Median time of one batch of n tokens after a 32-token context, per model, as a multiple of n=1."""
    print("\n## one batch of n tokens through each model (ms, and x one token)")
    sizes = (1, 2, 3, 5, 7, 9)
    print("| model | " + " | ".join(f"n={n}" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for role, path in paths.items():
        m = _llama.LlamaModel(path, n_ctx=256, n_threads=threads)
        try:
            toks = np.arange(100, 100 + 32 + max(sizes), dtype=np.int32) % m.n_vocab
            m.decode_batch(toks[:32], np.arange(32, dtype=np.int32), 0, 0)
            cost = {}
            for n in sizes:
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    m.decode_batch(toks[32 : 32 + n], np.arange(32, 32 + n, dtype=np.int32), 0, 1)
                    times.append(time.perf_counter() - t0)
                    m.seq_rm(0, 32, -1)
                cost[n] = statistics.median(times) * 1000
            cells = " | ".join(f"{cost[n]:.1f} ({cost[n] / cost[1]:.1f}x)" for n in sizes)
            print(f"| {role} | {cells} |")
        finally:
            m.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--unsure", type=float, default=None, help="override the drafter's stop threshold")
    args = ap.parse_args()
    if args.unsure is not None:
        speculative.UNSURE = args.unsure
    profile = find_profile("demo")
    paths = {r: profile.locate(r) for r in ("small_cpt", "small_base")}
    paths["large_ins"] = packaged.smollm2_path()
    print(f"llama.cpp: {_llama.system_info()}")
    print(f"{args.tokens} new tokens, median of {args.repeats} interleaved repeats")
    print(f"the drafter stops below p = {speculative.UNSURE}")
    with tm.Engine(paths, tm.LoadOptions(n_ctx=1024, n_threads=args.threads)) as eng:
        run(eng, args.tokens, args.repeats, tm.SamplingParams(), "greedy")
        run(eng, args.tokens, args.repeats, tm.SamplingParams(temperature=0.7, seed=1), "sampling, T = 0.7")
    batch_cost(paths, args.threads)


if __name__ == "__main__":
    main()
