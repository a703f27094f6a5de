"""The paper's setting at real size on this machine: a 7B large model fused with two 1.5B small models.

Runs on the three GGUF files ``make_synthetic.py`` writes (random weights with the real shapes of
Qwen2.5-7B-Instruct at q4_k_m and Qwen2.5-1.5B at q8_0; speed does not depend on the weights'
values). Everything in one run, on one engine, so the figures compare side by side:

* **decode**: tokens/s of the 7B alone, each 1.5B alone and the fused trio (fixed weights
  a = 0.3, b = 0.6, so all three models decode), repeated in turn; fused against the sum of the
  three (the speed of running them one after another: ``1 / sum(1 / alone)``), target >= 0.97;
* **prompt**: a 500-token prompt evaluated by the three models as generation with fixed weights
  does (last position's logits only), with logits at every position (left unread), and with PPL
  selection over the 36-pair grid at this 151,936-token vocabulary; the overhead of selection over
  each, target <= 10 %;
* **batch cost**: what a batch of k tokens (logits at every position, as verification needs) costs
  the 7B against one token, k = 1..16, and a single token of a 1.5B (a drafting step);
* **draft projection**: the acceptance rate of ``--draft 4`` measured on the demo trio (the weights
  here are random and accept nothing), turned into the speed ``--draft K`` would reach with the
  paper's models from the costs above: a round drafts K tokens with both small models (K + 1 single
  decodes each), verifies K + 1 tokens in one 7B batch, and yields (1 - r^(K+1)) / (1 - r) tokens at
  per-token acceptance r. A projection, not a measurement;
* **serve**: ``trimix serve`` on the trio with ``--parallel 8``: aggregate tokens/s with 1, 4 and 8
  concurrent streaming clients (target: 8 clients >= 3x one);
* **memory**: resident memory of the loaded trio (``--parallel 1``) and of the server at
  ``--parallel 8``, against the files' sizes.

    python benchmarks/bench_realsize.py --dir DIR [--tokens 32] [--prompt 500] [--repeats 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speculative import PROMPTS as SPECULATIVE_PROMPTS
from make_synthetic import TRIO, gguf_name

from trimix_cpp import _llama, packaged
from trimix_cpp.engine import Engine
from trimix_cpp.fusion import plan
from trimix_cpp.loading import LoadOptions
from trimix_cpp.profiles import find_profile
from trimix_cpp.selection import Selector
from trimix_cpp.server.launch import ServerProcess, start_server

ALPHA, BETA = 0.3, 0.6
SHORT = "The river runs"
TEXT = (
    "The river runs through the old town, past the market and the bridge where the fishermen sell "
    "their catch every morning. In the evening the lamps are lit and the children run along the water. "
)


def rss_mib(pid: int | str = "self") -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of a process, in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(line.split()[1]) / 1024
    return out


def tokens_of(eng: Engine, n: int, variant: int = 0) -> np.ndarray:
    toks = eng.tokenize(f"{variant}. " + TEXT * (1 + n // 20))
    while len(toks) < n:
        toks = np.concatenate([toks, toks])
    return toks[:n]


def decode_rates(eng: Engine, tokens: int, repeats: int) -> dict[str, float]:
    """Median tokens/s of each model alone and of the fused trio, measured in turn."""
    prompt = tokens_of(eng, 32)
    plans = {r: plan("single", role=r) for r in eng.roles}
    plans["fused"] = plan("trimix", alpha=ALPHA, beta=BETA)
    runs: dict[str, list[float]] = {k: [] for k in plans}
    for _ in range(repeats):
        for k, p in plans.items():
            gen = eng.generate(prompt, p, max_tokens=tokens).run()
            runs[k].append(gen.timings.gen_tokens_per_s)
    return {k: statistics.median(v) for k, v in runs.items()}


def prompt_times(eng: Engine, n: int, repeats: int) -> dict[str, float]:
    """Median seconds of a ``n``-token prompt: last logits only, every position's logits, PPL selection."""
    prompt = tokens_of(eng, n, variant=7)
    runs: dict[str, list[float]] = {"last": [], "all": [], "ppl": []}

    def unread(rows: object, targets: object) -> None:
        return None

    for _ in range(repeats):
        t0 = time.perf_counter()
        eng.evaluate_prompt(prompt)
        runs["last"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        eng.evaluate_prompt(prompt, on_chunk=unread)
        runs["all"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        eng.select(prompt, Selector("ppl"))
        runs["ppl"].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in runs.items()}


def batch_costs(model: _llama.LlamaModel, seq: int, ks: list[int], repeats: int = 3) -> dict[int, float]:
    """Median ms of one decode of k tokens (every position's logits) after a 64-token context."""
    ctx = np.arange(100, 164, dtype=np.int32)
    model.seq_rm(seq)
    model.decode_batch(ctx, np.arange(64, dtype=np.int32), seq, np.zeros(64, dtype=np.int8))
    out = {}
    for k in ks:
        times = []
        for _ in range(repeats):
            toks = np.arange(200, 200 + k, dtype=np.int32)
            t0 = time.perf_counter()
            model.decode_batch(toks, np.arange(64, 64 + k, dtype=np.int32), seq, np.ones(k, dtype=np.int8))
            times.append(time.perf_counter() - t0)
            model.seq_rm(seq, 64, -1)
        out[k] = statistics.median(times) * 1000
    model.seq_rm(seq)
    return out


def demo_acceptance(tokens: int = 64) -> dict[str, float]:
    """Share of drafted tokens accepted with ``--draft 4`` on the demo trio (greedy, bench_speculative's
    Uyghur prompt), with the weights PPL selection picks and with a = 0.3, b = 0.7."""
    profile = find_profile("demo")
    paths = {r: profile.locate(r) for r in ("small_cpt", "small_base")}
    paths["large_ins"] = packaged.smollm2_path()
    prompt = SPECULATIVE_PROMPTS["uig"]
    out = {}
    with Engine(paths, LoadOptions(n_ctx=1024)) as eng:
        sel = eng.select(prompt, Selector("ppl"))
        for label, (a, b) in (("ppl", sel.chosen), ("fixed", (0.3, 0.7))):
            gen = eng.generate(prompt, plan("trimix", alpha=a, beta=b), max_tokens=tokens, draft=4).run()
            t = gen.timings
            if t.draft_tokens:
                out[f"{label} ({a:g}, {b:g})"] = t.accepted_tokens / t.draft_tokens
    return out


def project(costs: dict[int, float], small_ms: float, r: float, k: int) -> float:
    """Projected tokens/s of ``--draft k`` at per-token acceptance ``r`` (see the module docstring)."""
    expected = k + 1 if r >= 1 else (1 - r ** (k + 1)) / (1 - r)
    round_ms = (k + 1) * small_ms + costs[k + 1]
    return 1000 * expected / round_ms


def complete(url: str, prompt: str, tokens: int) -> int:
    """Tokens generated for one streamed completion (the usage the stream ends with)."""
    body = {"prompt": prompt, "max_tokens": tokens, "stop": [], "stream": True}
    body["stream_options"] = {"include_usage": True}
    n = 0
    with (
        httpx.Client(timeout=900, trust_env=False) as c,
        c.stream("POST", url + "/v1/completions", json=body) as r,
    ):
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                n = (json.loads(line[6:]).get("usage") or {}).get("completion_tokens", n)
    return n


def start(paths: dict[str, Path], parallel: int) -> ServerProcess:
    """``trimix serve`` on the trio with fixed weights, ``--parallel`` sequences."""
    args = ["--parallel", str(parallel), "--method", "trimix", "--alpha", str(ALPHA), "--beta", str(BETA)]
    for role, p in paths.items():
        args += [f"--{role.replace('_', '-')}", str(p)]
    return start_server(args, start_timeout=600, ready_timeout=600)


def serve_rates(url: str, clients: list[int], tokens: int) -> dict[int, float]:
    """Aggregate generated tokens/s (all requests' tokens over the wall time) with C concurrent clients.

    The prompts are short (a few words, each client's own), so the figure is decoding's: a 7B
    evaluates about a dozen prompt tokens per second on two cores."""
    out = {}
    complete(url, SHORT, 4)  # warm-up
    for c in clients:
        counts = [0] * c
        per_client = 2 if c == 1 else 1

        def client(i: int, counts: list[int], repeat: int) -> None:
            for j in range(repeat):
                counts[i] += complete(url, f"{i}.{j} {SHORT}", tokens)

        threads = [threading.Thread(target=client, args=(i, counts, per_client)) for i in range(c)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out[c] = sum(counts) / (time.perf_counter() - t0)
    return out


SECTIONS = ("decode", "prompt", "batch", "serve")


def measure_engine(paths: dict[str, Path], args: argparse.Namespace, only: set[str], report: dict) -> None:
    """The in-process sections, on one engine loaded once (``--parallel 1``)."""
    with Engine(paths, LoadOptions(n_ctx=2048)) as eng:
        eng.scheduler.governor = None  # every figure at the default thread count
        report["rss_loaded_mib"] = rss_mib()
        if "decode" in only:
            print("decode ...", file=sys.stderr)
            report["decode_tokens_per_s"] = dec = decode_rates(eng, args.tokens, args.repeats)
            report["rss_after_decode_mib"] = rss_mib()
            report["fused_vs_sum"] = dec["fused"] * sum(1 / dec[r] for r in TRIO)
        if "prompt" in only:
            print("prompt ...", file=sys.stderr)
            report["prompt_s"] = pt = prompt_times(eng, args.prompt, args.repeats)
            report["ppl_overhead_vs_last"] = pt["ppl"] / pt["last"] - 1
            report["ppl_overhead_vs_all"] = pt["ppl"] / pt["all"] - 1
        if "batch" in only:
            print("batch cost ...", file=sys.stderr)
            seq = eng._fresh_scratch()
            report["batch_ms_large"] = batch_costs(eng.models["large_ins"], seq, list(range(1, 17)))
            report["single_ms_small"] = batch_costs(eng.models["small_cpt"], seq, [1])[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True, help="Folder make_synthetic.py wrote.")
    ap.add_argument("--tokens", type=int, default=32, help="Tokens per decode measurement and per request.")
    ap.add_argument("--prompt", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"Sections to run, of {','.join(SECTIONS)}.")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    only = set(args.only.split(","))
    paths = {role: args.dir / gguf_name(role) for role in TRIO}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise SystemExit(f"missing {missing[0]}: run benchmarks/make_synthetic.py --out {args.dir} first")
    report: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {_llama.default_threads()} threads",
        "system_info": _llama.system_info(),
        "files_mib": {r: p.stat().st_size / 2**20 for r, p in paths.items()},
        "prompt_tokens": args.prompt,
        "tokens": args.tokens,
    }
    t_start = time.perf_counter()
    if only & {"decode", "prompt", "batch"}:
        measure_engine(paths, args, only, report)
    if {"decode", "batch"} <= only:
        print("draft acceptance on the demo trio ...", file=sys.stderr)
        acc = report["demo_acceptance"] = demo_acceptance()
        small_ms = 2 * report["single_ms_small"]  # both small models decode each drafted position
        report["draft_projection_tokens_per_s"] = {
            name: {k: project(report["batch_ms_large"], small_ms, r, k) for k in (2, 4, 6, 8)}
            for name, r in acc.items()
        }
    if "serve" in only:
        print("serve ...", file=sys.stderr)
        clients = [int(c) for c in args.clients.split(",")]
        srv = start(paths, parallel=max(clients))
        try:
            report["serve_tokens_per_s"] = sr = serve_rates(srv.url, clients, args.tokens)
            report["rss_server_mib"] = rss_mib(srv.proc.pid)
        finally:
            srv.stop()
        report["serve_most_vs_one"] = sr[max(clients)] / sr[min(clients)]
    report["seconds"] = time.perf_counter() - t_start
    print(json.dumps(report) if args.json else render(report))


def render(report: dict) -> str:
    """The report as lines of text."""
    out = [f"machine: {report['machine']}; llama.cpp: {report['system_info']}"]
    files = sum(report["files_mib"].values())
    if "decode_tokens_per_s" in report:
        dec = report["decode_tokens_per_s"]
        out.append("decode tokens/s: " + ", ".join(f"{k} {v:.2f}" for k, v in dec.items()))
        out.append(f"fused / sum of the three (1/sum(1/alone)): {report['fused_vs_sum']:.3f} (target >= 0.97)")
    if "prompt_s" in report:
        pt = report["prompt_s"]
        out.append(
            f"prompt of {report['prompt_tokens']} tokens: last-only {pt['last']:.1f} s, all positions "
            f"{pt['all']:.1f} s, PPL selection {pt['ppl']:.1f} s; overhead {report['ppl_overhead_vs_last']:+.1%} "
            f"vs last-only, {report['ppl_overhead_vs_all']:+.1%} vs all positions (target <= 10 %)"
        )
    if "batch_ms_large" in report:
        large = report["batch_ms_large"]
        one = large[1]
        cells = ", ".join(f"{k}: {v:.0f} ({v / one:.2f}x)" for k, v in large.items())
        out.append(f"7B batch ms (x one token): {cells}")
        out.append(f"1.5B single token: {report['single_ms_small']:.0f} ms")
    for name, proj in report.get("draft_projection_tokens_per_s", {}).items():
        fused = report["decode_tokens_per_s"]["fused"]
        out.append(
            f"draft projection at demo acceptance {report['demo_acceptance'][name]:.0%} [{name}]: "
            + ", ".join(f"K={k} {v:.2f} tok/s ({v / fused:.2f}x)" for k, v in proj.items())
        )
    if "serve_tokens_per_s" in report:
        sr = report["serve_tokens_per_s"]
        out.append("serve aggregate tokens/s: " + ", ".join(f"{c} clients {v:.2f}" for c, v in sr.items()))
        out.append(f"serve: {max(sr)} clients / {min(sr)} = {report['serve_most_vs_one']:.2f} (target for 8 / 1: >= 3)")
        out.append(f"server RSS at --parallel {max(sr)}: {report['rss_server_mib']['VmRSS']:.0f} MiB")
    if "rss_loaded_mib" in report:
        out.append(f"files {files:.0f} MiB; engine RSS loaded {report['rss_loaded_mib']['VmRSS']:.0f} MiB")
    out.append(f"total {report['seconds']:.0f} s")
    return "\n".join(out)


if __name__ == "__main__":
    main()
