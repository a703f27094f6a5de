"""What isolation costs: a KV cache per sequence without flash attention, against one shared cache.

Requests decode side by side in both layouts (the demo trio, greedy, a different prompt each, the
weights fixed), interleaved run by run; printed per number of sequences: aggregate decode tokens/s
in each layout, their ratio, and how often a request's tokens differ from the same request decoded
alone (the isolated layout must show 0). The KV memory of each layout is llama.cpp's own figure.

    python benchmarks/bench_isolation.py [--seqs 1,4,8,16] [--tokens 64] [--repeats 3] [--threads 0]
"""

from __future__ import annotations

import argparse
import statistics
import time

import trimix_cpp as tm
from trimix_cpp._llama import system_info
from trimix_cpp.engine import SeqSpec
from trimix_cpp.profiles import find_profile

LINES = [
    "The river runs through the old town, past the market and the bridge where",
    "ئالاقەداشنى ئۆچۈرۈش مەغلۇپ بولدى",
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "ھۆججەتنى ساقلاش",
    "The capital of France is",
    "In the evening the lamps are lit and the children",
    "ئۈسكۈنە تېپىلمىدى",
]


def run(paths, n_seq: int, isolated: bool, tokens: int, threads: int | None) -> tuple[float, list[list[int]]]:
    cells = None if isolated else 256 * n_seq
    options = tm.LoadOptions(n_ctx=256, n_seq=n_seq, n_threads=threads, isolated=isolated, kv_cells=cells)
    prompts = [LINES[i % len(LINES)] + " " * (i // len(LINES)) for i in range(n_seq)]
    with tm.Engine(paths, options) as eng:
        gens = eng.generate_batch(prompts, [spec(i, tokens) for i in range(n_seq)])
        t0 = time.perf_counter()
        eng.run(gens)
        wall = time.perf_counter() - t0 - sum(g.timings.prompt_s for g in gens)
        return sum(g.timings.gen_tokens for g in gens) / wall, [g.token_ids for g in gens]


def spec(i: int, tokens: int) -> SeqSpec:
    """Request i's settings: lengths from a quarter of ``tokens`` to all of it, so that requests end
    while others continue."""
    return SeqSpec(tm.plan("trimix", alpha=0.3, beta=0.7), max_tokens=max(1, tokens * (i % 4 + 1) // 4))


def alone(paths, n: int, tokens: int, threads: int | None) -> list[list[int]]:
    out = []
    with tm.Engine(paths, tm.LoadOptions(n_ctx=256, n_threads=threads)) as eng:
        for i in range(n):
            prompt = LINES[i % len(LINES)] + " " * (i // len(LINES))
            out.append(eng.generate_many(prompt, [spec(i, tokens)])[0].run().token_ids)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default="1,4,8,16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    threads = args.threads or None
    profile = find_profile("demo")
    paths = {r: profile.locate(r) for r in ("large_ins", "small_cpt", "small_base")}
    seqs = [int(x) for x in args.seqs.split(",")]
    ref = alone(paths, max(seqs), args.tokens, threads)
    print(system_info())
    print(f"# demo trio, {args.tokens} tokens per sequence, median of {args.repeats}, aggregate decode tokens/s")
    print("| sequences | isolated | shared | isolated / shared | differ from alone (isolated / shared) |")
    print("|---|---|---|---|---|")
    for n in seqs:
        rates: dict[bool, list[float]] = {True: [], False: []}
        differ: dict[bool, int] = {True: 0, False: 0}
        for _ in range(args.repeats):
            for iso in (True, False):
                rate, toks = run(paths, n, iso, args.tokens, threads)
                rates[iso].append(rate)
                differ[iso] = max(differ[iso], sum(t != r for t, r in zip(toks, ref)))
        a, b = statistics.median(rates[True]), statistics.median(rates[False])
        print(f"| {n} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {differ[True]} / {differ[False]} of {n} |")


if __name__ == "__main__":
    main()
