"""What perplexity selection costs on top of the prompt evaluations it shares with generation.

For prompts of about 500 and 4,000 tokens on the Gemma 3 270M trio (262,144-token vocabulary),
each measured in a fresh process so peak memory is its own:

* ``eval``: the three all-position prompt evaluations alone, in the same chunks selection uses,
  logits computed by llama.cpp and left unread (the floor: generation needs this evaluation anyway);
* ``select``: ``Engine.select``, the same evaluations plus the reduction of every chunk's logits into
  the 36-pair grid's NLL sums; ``overhead = select - eval`` as a share of ``eval``;
* variants of the reduction on the same logits (two threads; no power chains), and the naive dense
  loop (36 float32 logsumexps per position) timed on a sample of positions and scaled up;
* peak RSS of each process.

    python benchmarks/bench_select.py [--sizes 500,4000] [--max-logits-mib 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import trimix_cpp as tm
from trimix_cpp import packaged
from trimix_cpp.selection import DEFAULT_GRID, SELECTION_ROLES, GridNLL, Selector

TEXT = Path(__file__).resolve().parent.parent / "models" / "demo" / "data" / "ug_heldout.txt"


def prompt_tokens(eng: tm.Engine, n: int) -> np.ndarray:
    text = TEXT.read_text(encoding="utf-8") if TEXT.is_file() else "The river runs past the old mill. " * 400
    toks = eng.tokenize(text)
    while len(toks) < n:
        toks = np.concatenate([toks, toks[1:]])
    return toks[:n]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(kind: str, n: int, max_mib: float) -> dict[str, float]:
    path = packaged.gemma3_270m_path()
    opts = tm.LoadOptions(n_ctx=max(512, n + 64))
    with tm.Engine({r: path for r in SELECTION_ROLES}, opts) as eng:
        toks = prompt_tokens(eng, n)
        sel = Selector("ppl", max_logits_mib=max_mib)
        vocab = [eng.models[r].n_vocab for r in SELECTION_ROLES]
        chunk = sel.chunk_rows(eng.vocab.n_vocab, vocab, 512)
        rss0 = peak_rss_mib()
        t0 = time.perf_counter()
        out: dict[str, float] = {"tokens": n, "chunk_rows": chunk}
        if kind == "eval":
            eng.evaluate_prompt(toks, SELECTION_ROLES, lambda rows, targets: None, chunk)
        elif kind == "select":
            s = eng.select(toks, sel)
            out["dense_fallbacks"] = s.dense_fallbacks
        else:  # reduction variants on one chunk's real logits, timed per position
            rows_seen: list[float] = []

            def variant(rows, targets):
                if rows_seen:
                    return
                a, b, c = (np.array(rows[r][: len(targets)]) for r in ("large_ins", "small_cpt", "small_base"))
                for name, threads, grid in (
                    ("default (1 thread)", None, DEFAULT_GRID),
                    ("2 threads", 2, DEFAULT_GRID),
                    ("no power chain", None, tuple(g + 1e-7 for g in DEFAULT_GRID)),
                ):
                    with GridNLL(grid, grid, eng.vocab.n_vocab, threads) as g:
                        t = time.perf_counter()
                        g.add(a, b, c, targets)
                        out[f"ms/pos {name}"] = (time.perf_counter() - t) / len(targets) * 1e3
                k = min(8, len(targets))
                t = time.perf_counter()
                for i in range(k):
                    for al in DEFAULT_GRID:
                        for be in DEFAULT_GRID:
                            f = c[i] + al * (a[i] - c[i]) + be * (b[i] - c[i])
                            m = f.max()
                            _ = m + np.log(np.exp(f - m).sum()) - f[targets[i]]
                out["ms/pos naive dense"] = (time.perf_counter() - t) / k * 1e3
                rows_seen.append(1.0)

            eng.evaluate_prompt(toks, SELECTION_ROLES, variant, chunk)
        out["seconds"] = time.perf_counter() - t0
        out["peak_rss_mib"] = peak_rss_mib()
        out["rss_before_mib"] = rss0
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="500,4000")
    ap.add_argument("--max-logits-mib", type=float, default=512.0)
    ap.add_argument("--one", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.max_logits_mib)))
        return
    print(f"llama.cpp: {tm._llama.system_info()}")
    for n in (int(x) for x in args.sizes.split(",")):
        res = {}
        kinds = ("eval", "select", "eval", "select") + (("variants",) if n <= 1000 else ())
        for kind in kinds:
            cmd = [sys.executable, __file__, "--one", kind, str(n), "--max-logits-mib", str(args.max_logits_mib)]
            r = json.loads(subprocess.run(cmd, capture_output=True, check=True, text=True).stdout)
            res.setdefault(kind, []).append(r)
        ev = min(r["seconds"] for r in res["eval"])
        se = min(r["seconds"] for r in res["select"])
        s0 = res["select"][0]
        print(
            f"{n:>5} tokens | chunk {int(s0['chunk_rows'])} rows | 3x all-position eval {ev:6.2f} s | "
            f"select {se:6.2f} s | overhead {se - ev:5.2f} s = {(se - ev) / ev * 100:4.1f}% of eval | "
            f"peak RSS eval {max(r['peak_rss_mib'] for r in res['eval']):.0f} MiB, "
            f"select {max(r['peak_rss_mib'] for r in res['select']):.0f} MiB",
            flush=True,
        )
        if "variants" not in res:
            continue
        v = res["variants"][0]
        per_pos = {k: val for k, val in v.items() if k.startswith("ms/pos")}
        print("        reduction per position: " + ", ".join(f"{k[7:]} {val:.2f} ms" for k, val in per_pos.items()))
        print(
            f"        naive dense at this size would add {v['ms/pos naive dense'] * n / 1e3:.1f} s "
            f"({v['ms/pos naive dense'] * n / 1e3 / ev * 100:.0f}% of eval)",
            flush=True,
        )


if __name__ == "__main__":
    main()
