"""Generation speed on an idle machine and beside one CPU-bound process, per thread setting.

llama.cpp's threads meet at a barrier after every operation of a decode; when another process takes
a core, a thread waits at each barrier for a descheduled sibling. trimix's scheduler follows what a
step costs with every core and with one thread (trimix_cpp/threads.py). This benchmark runs
``trimix generate --lang demo -n N --json`` in fresh processes for each setting, idle and with one
busy loop beside it, interleaved, and prints decode tokens/s (medians) and the busy/idle ratio:

* ``fixed``: ``--threads`` = every core, which turns the adaptation off (trimix before it);
* ``default``: trimix as shipped (every core, adapting);
* ``spin=N``: the default with ``GOMP_SPINCOUNT=N``; ``passive``: with ``OMP_WAIT_POLICY=PASSIVE``;
* ``threads=1``: ``--threads 1``.

``--serve`` measures ``trimix serve --lang demo`` the same way: one client streams a completion.

    python benchmarks/bench_busy.py [--tokens 64] [--repeats 3] [--serve]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PROMPT = "ئالاقەداشنى ئۆچۈرۈش"
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def settings(spins: list[int]) -> dict[str, tuple[list[str], dict[str, str]]]:
    """name -> (command prefix, environment changes); ``--threads-N`` in a prefix is moved into the
    subcommand's own options."""
    base = [sys.executable, "-m", "trimix_cli.main"]
    out = {"fixed": ([*base, f"--threads-{CORES}"], {}), "default": (base, {})}
    for n in spins:
        out[f"spin={n}"] = (base, {"GOMP_SPINCOUNT": str(n)})
    out["passive"] = (base, {"OMP_WAIT_POLICY": "PASSIVE"})
    out["threads=1"] = ([*base, "--threads-1"], {})
    return out


def split_threads(cmd: list[str]) -> tuple[list[str], list[str]]:
    """The command without its ``--threads-N`` marker, and the options it stands for."""
    marks = [c for c in cmd if c.startswith("--threads-")]
    rest = [c for c in cmd if not c.startswith("--threads-")]
    return rest, (["--threads", marks[0].removeprefix("--threads-")] if marks else [])


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(extra)
    return env


def generate(cmd: list[str], env: dict[str, str], tokens: int, single: bool) -> float:
    cmd, threads = split_threads(cmd)
    args = ["generate", "--lang", "demo", "-n", str(tokens), "--json", *threads]
    if single:
        args += ["--method", "single"]
    r = subprocess.run([*cmd, *args, PROMPT], capture_output=True, text=True, env=clean_env(env), timeout=900)
    if r.returncode != 0:
        raise SystemExit(f"generate failed: {args} {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout)["timings"]["gen_tokens_per_s"]


def serve_once(cmd: list[str], env: dict[str, str], tokens: int) -> float:
    import httpx

    from trimix_cpp.server.launch import start_server

    cmd, threads = split_threads(cmd)
    server = start_server(["--lang", "demo", *threads], command=cmd, env=clean_env(env))
    try:
        body = {"prompt": PROMPT, "max_tokens": tokens, "stop": [], "stream": True}
        first = None
        n = 0
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=900) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    if first is None:
                        first = time.perf_counter()
                    n += 1
        end = time.perf_counter()
        return (n - 1) / (end - first) if first is not None and n > 1 else float("nan")
    finally:
        server.stop()


def busy_loop() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--spins", default="", help="GOMP_SPINCOUNT values to compare, e.g. 1000,10000")
    ap.add_argument("--serve", action="store_true", help="measure trimix serve (one streaming client)")
    ap.add_argument("--only", default="", help="comma-separated setting names to run (default: all)")
    args = ap.parse_args()
    spins = [int(x) for x in args.spins.split(",") if x]
    table = settings(spins)
    if args.only:
        table = {k: v for k, v in table.items() if k in args.only.split(",")}
    modes = ["serve"] if args.serve else ["fused", "single"]
    res: dict[tuple[str, str, str], list[float]] = {}
    for _ in range(args.repeats):
        for mode in modes:
            for state in ("idle", "busy"):
                for name, (cmd, env) in table.items():
                    hog = busy_loop() if state == "busy" else None
                    try:
                        time.sleep(0.3 if hog else 0)
                        if mode == "serve":
                            v = serve_once(cmd, env, args.tokens)
                        else:
                            v = generate(cmd, env, args.tokens, single=mode == "single")
                    finally:
                        if hog:
                            hog.kill()
                            hog.wait()
                    res.setdefault((mode, state, name), []).append(v)
    print(f"# {args.tokens} tokens, median of {args.repeats}; decode tokens/s (busy = one CPU-bound process beside)")
    print("| mode | setting | idle tok/s | busy tok/s | busy / idle | idle vs fixed |")
    print("|---|---|---|---|---|---|")
    for mode in modes:
        ref = statistics.median(res[(mode, "idle", "fixed")]) if (mode, "idle", "fixed") in res else None
        for name in table:
            idle = statistics.median(res[(mode, "idle", name)])
            busy = statistics.median(res[(mode, "busy", name)])
            rel = f"{idle / ref:.2f}x" if ref else "-"
            print(f"| {mode} | {name} | {idle:.1f} | {busy:.1f} | {busy / idle:.2f} | {rel} |")


if __name__ == "__main__":
    main()
