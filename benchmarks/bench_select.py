"""What perplexity selection costs on top of the prompt evaluations it shares with generation.

For prompts of about 500 and 4,000 tokens on the Gemma 3 270M trio (262,144-token vocabulary), each
size in a fresh process that loads the models once and then alternates the two measurements, so
that a slow spell of a shared machine hits both alike:

* ``eval``: the three all-position prompt evaluations alone, in the same chunks selection uses,
  logits computed by llama.cpp and left unread (the floor: generation needs this evaluation anyway);
* ``select``: ``Engine.select``, the same evaluations plus the reduction of every chunk's logits into
  the 36-pair grid's NLL sums.

The overhead of each repeat is its select minus the eval just before it, as a share of that eval;
the figures are medians over the repeats with their min and max. Beside it, the reduction's own
time (``GridNLL.add``, timed inside the select runs) per prompt position: times the positions, it
should account for the end-to-end overhead, so each figure checks the other. The first selection
in a process also loads the compiled kernel (numba import and cached machine code, on a background
thread while llama.cpp decodes the first chunk); it is reported on its own line, not in the medians.
Then, on one chunk's real logits, the reduction's variants (kernels, threads, no power chains) and
the naive dense loop (36 float32 logsumexps per position, timed on a sample of positions).

    python benchmarks/bench_select.py [--sizes 500,4000] [--repeats 5,3] [--max-logits-mib 512] [--kernel numpy]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import trimix_cpp as tm
from trimix_cpp import packaged, selection
from trimix_cpp.selection import DEFAULT_GRID, KERNEL_ENV, SELECTION_ROLES, GridNLL, Selector

TEXT = Path(__file__).resolve().parent.parent / "models" / "demo" / "data" / "ug_heldout.txt"


def prompt_tokens(eng: tm.Engine, n: int) -> np.ndarray:
    text = TEXT.read_text(encoding="utf-8") if TEXT.is_file() else "The river runs past the old mill. " * 400
    toks = eng.tokenize(text)
    while len(toks) < n:
        toks = np.concatenate([toks, toks[1:]])
    return toks[:n]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def numpy_simd() -> str:
    """The SIMD extensions numpy dispatches to on this machine (AVX2 and AVX-512 paths differ)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats
    except ImportError:
        return "unknown"
    wanted = ("AVX2", "FMA3", "AVX512F", "AVX512_SKX")
    return ", ".join(f"{k}={'yes' if feats.get(k) else 'no'}" for k in wanted)


class ReductionClock:
    """Wall time spent inside ``GridNLL.add`` and the positions it folded, for the select runs."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.rows = 0
        self._add = GridNLL.add

        def timed(grid: GridNLL, a, b, c, targets) -> None:
            t = time.perf_counter()
            self._add(grid, a, b, c, targets)
            self.seconds += time.perf_counter() - t
            self.rows += len(targets)

        GridNLL.add = timed  # type: ignore[method-assign]

    def take(self) -> tuple[float, int]:
        out = (self.seconds, self.rows)
        self.seconds, self.rows = 0.0, 0
        return out


def variants(eng: tm.Engine, toks: np.ndarray, chunk: int) -> dict[str, float]:
    """Per-position time of the reduction's variants on the first chunk's real logits."""
    out: dict[str, float] = {}
    kernels = ["numba", "numpy"] if selection.resolve_kernel() == "numba" else ["numpy"]

    def run(rows, targets) -> None:
        if out:
            return
        a, b, c = (np.array(rows[r][: len(targets)]) for r in ("large_ins", "small_cpt", "small_base"))
        cases = [(f"{k}, {t} thread{'s' if t > 1 else ''}", k, t, DEFAULT_GRID) for k in kernels for t in (1, 2)]
        cases += [(f"{k}, no power chain", k, 1, tuple(g + 1e-7 for g in DEFAULT_GRID)) for k in kernels]
        for name, kernel, threads, grid in cases:
            times = []
            for _ in range(3):
                with GridNLL(grid, grid, eng.vocab.n_vocab, threads, kernel=kernel) as g:
                    g.add(a[:1], b[:1], c[:1], targets[:1])  # the kernel loaded, the scratch touched
                    t = time.perf_counter()
                    g.add(a, b, c, targets)
                    times.append((time.perf_counter() - t) / len(targets) * 1e3)
            out[name] = statistics.median(times)
        k = min(8, len(targets))
        t = time.perf_counter()
        for i in range(k):
            for al in DEFAULT_GRID:
                for be in DEFAULT_GRID:
                    f = c[i] + al * (a[i] - c[i]) + be * (b[i] - c[i])
                    m = f.max()
                    _ = m + np.log(np.exp(f - m).sum()) - f[targets[i]]
        out["naive dense"] = (time.perf_counter() - t) / k * 1e3

    eng.evaluate_prompt(toks, SELECTION_ROLES, run, chunk)
    return out


def run_size(n: int, repeats: int, max_mib: float, with_variants: bool) -> dict[str, object]:
    """One size in this process: warm-up, eval, first (cold) select, then ``repeats`` x (eval, select)."""
    path = packaged.gemma3_270m_path()
    opts = tm.LoadOptions(n_ctx=max(512, n + 64))
    clock = ReductionClock()
    with tm.Engine({r: path for r in SELECTION_ROLES}, opts) as eng:
        toks = prompt_tokens(eng, n)
        sel = Selector("ppl", max_logits_mib=max_mib)
        vocab = [eng.models[r].n_vocab for r in SELECTION_ROLES]
        chunk = sel.chunk_rows(eng.vocab.n_vocab, vocab, 512)

        def timed(fn: Callable[[], object]) -> float:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t

        def ev() -> float:
            took = timed(lambda: eng.evaluate_prompt(toks, SELECTION_ROLES, lambda rows, targets: None, chunk))
            # evaluate_prompt leaves its cells for callers that read them; select wants an empty sequence
            for m in eng.models.values():
                m.seq_rm(eng._scratch_seq)
            return took

        fallbacks = []

        def se() -> float:
            def go() -> None:
                fallbacks.append(eng.select(toks, sel).dense_fallbacks)

            return timed(go)

        eng.evaluate_prompt(toks[:8], SELECTION_ROLES)  # llama.cpp's first decode, outside every figure
        for m in eng.models.values():
            m.seq_rm(eng._scratch_seq)
        rss0 = peak_rss_mib()
        eval_first = ev()
        rss_eval = peak_rss_mib()
        cold = se()
        cold_reduce, _ = clock.take()
        rss_select = peak_rss_mib()
        evals, selects, reduce_s, reduce_rows = [eval_first], [], [], []
        for _ in range(repeats):
            evals.append(ev())
            selects.append(se())
            s, rows = clock.take()
            reduce_s.append(s)
            reduce_rows.append(rows)
        out: dict[str, object] = {
            "tokens": n,
            "chunk_rows": chunk,
            "kernel": selection.resolve_kernel(),
            "evals": evals,
            "selects": selects,
            "reduce_s": reduce_s,
            "reduce_rows": reduce_rows,
            "cold_select": cold,
            "cold_eval": eval_first,
            "cold_reduce_s": cold_reduce,
            "dense_fallbacks": max(fallbacks),
            "rss_before_mib": rss0,
            "rss_eval_mib": rss_eval,
            "rss_select_mib": rss_select,
        }
        if with_variants:
            out["variants"] = variants(eng, toks, chunk)
        return out


def spread(xs: list[float], fmt: str = "{:.2f}") -> str:
    return f"median {fmt.format(statistics.median(xs))} (min {fmt.format(min(xs))}, max {fmt.format(max(xs))})"


def report(r: dict) -> None:
    n = int(r["tokens"])
    evals, selects = r["evals"], r["selects"]
    paired_evals = evals[1:]  # the eval just before each select
    over = [s - e for s, e in zip(selects, paired_evals)]
    share = [(s - e) / e * 100 for s, e in zip(selects, paired_evals)]
    per_pos = [s / rows * 1e3 for s, rows in zip(r["reduce_s"], r["reduce_rows"])]
    reduce_share = [s / e * 100 for s, e in zip(r["reduce_s"], paired_evals)]
    eval_med = statistics.median(evals)
    print(f"{n:>5} tokens | chunk {r['chunk_rows']} rows | kernel {r['kernel']} | {len(selects)} x (eval, select)")
    print(f"        3x all-position eval      {spread(evals)} s")
    print(f"        eval + PPL selection      {spread(selects)} s")
    print(f"        overhead (select - eval)  {spread(over)} s = {spread(share, '{:.1f}')} % of eval")
    print(
        f"        reduction alone           {spread(per_pos, '{:.3f}')} ms/position x {r['reduce_rows'][0]} "
        f"= {spread(reduce_share, '{:.1f}')} % of eval"
    )
    cold = r["cold_select"] - eval_med
    print(
        f"        first select of the process (kernel loads): {r['cold_select']:.2f} s, "
        f"{cold:+.2f} s = {cold / eval_med * 100:+.1f} % over the median eval "
        f"(reduction {r['cold_reduce_s']:.2f} s)"
    )
    print(
        f"        peak RSS: before {r['rss_before_mib']:.0f} MiB, after eval {r['rss_eval_mib']:.0f} MiB, "
        f"after select {r['rss_select_mib']:.0f} MiB; dense fallbacks {r['dense_fallbacks']}",
        flush=True,
    )
    v = r.get("variants")
    if v:
        naive = v.pop("naive dense")
        print("        reduction per position on one chunk: " + ", ".join(f"{k} {x:.2f} ms" for k, x in v.items()))
        print(
            f"        naive dense: {naive:.1f} ms/position, would add {naive * n / 1e3:.1f} s "
            f"({naive * n / 1e3 / eval_med * 100:.0f}% of eval)",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="500,4000")
    ap.add_argument("--repeats", default="5,3", help="(eval, select) pairs per size, one number or one per size")
    ap.add_argument("--max-logits-mib", type=float, default=512.0)
    ap.add_argument("--kernel", choices=selection.KERNELS, help=f"force a reduction kernel (sets {KERNEL_ENV})")
    ap.add_argument("--one", nargs=3, metavar=("N", "REPEATS", "VARIANTS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        n, reps, var = (int(x) for x in args.one)
        print(json.dumps(run_size(n, reps, args.max_logits_mib, bool(var))))
        return
    env = dict(os.environ)
    if args.kernel:
        env[KERNEL_ENV] = args.kernel
        os.environ[KERNEL_ENV] = args.kernel
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical cores; numpy {np.__version__} SIMD: {numpy_simd()}")
    print(f"llama.cpp: {tm._llama.system_info()}")
    kernel = selection.resolve_kernel()
    if kernel == "numba":
        import numba

        kernel = f"numba {numba.__version__}"
    print(f"selection kernel: {kernel}; load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    sizes = [int(x) for x in args.sizes.split(",")]
    reps = [int(x) for x in args.repeats.split(",")]
    reps += [reps[-1]] * (len(sizes) - len(reps))
    for n, r in zip(sizes, reps):
        cmd = [sys.executable, __file__, "--one", str(n), str(r), str(int(n <= 1000))]
        cmd += ["--max-logits-mib", str(args.max_logits_mib)]
        res = json.loads(subprocess.run(cmd, capture_output=True, check=True, text=True, env=env).stdout)
        report(res)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
