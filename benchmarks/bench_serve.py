"""trimix serve under load: concurrent streaming clients on the demo trio, then a soak with disconnects.

Starts ``trimix serve --lang demo`` on a free local port and drives it over HTTP from client threads.

* **Concurrency** (``--clients 1,4,8,16``): each of C clients sends ``--requests`` streaming
  completions one after another (a Uyghur line of the demo's held-out text as the prompt, the
  server's default PPL selection, ``--tokens`` tokens, no stop string). Printed per C: aggregate
  generated tokens/s (all tokens / wall time), per-client tokens/s (each request's tokens over its
  own duration, mean), time to first token p50/p95, and errors.
* **Soak** (``--soak 300``): that many requests from 8 clients with random lengths; a third hang up
  after a random number of chunks, a tenth are not streamed. Every response that completes is
  checked (the stream ends with ``[DONE]``, its pieces join to a text, the finish reason and usage
  are there); the server's resident memory is read before (after a warm-up) and after.

    python benchmarks/bench_serve.py [--clients 1,4,8,16] [--requests 3] [--tokens 64] [--soak 300]
        [--parallel 16] [--threads 0]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from trimix_cpp.server.launch import ServerProcess, ServerStartError, start_server

ROOT = Path(__file__).resolve().parent.parent


def _prompts() -> list[str]:
    """The first half (whole words) of each held-out Uyghur line: a text to continue, since the demo's
    small models, trained on whole lines, tend to end a complete line at once."""
    out = []
    for line in (ROOT / "models" / "demo" / "data" / "ug_heldout.txt").read_text(encoding="utf-8").splitlines():
        words = line.split()
        if len(words) >= 4 and "%" not in line:
            out.append(" ".join(words[: len(words) // 2]))
    return out


PROMPTS = _prompts()


@dataclass
class Result:
    ok: bool
    tokens: int = 0
    ttft: float = 0.0
    seconds: float = 0.0
    error: str = ""
    disconnected: bool = False


def start_demo(parallel: int, queue: int, threads: int, extra: list[str] | None = None) -> ServerProcess:
    """``trimix serve --lang demo`` with these settings, once its models are loaded."""
    args = ["--lang", "demo", "--parallel", str(parallel), "--queue", str(queue), "--threads", str(threads)]
    try:
        return start_server([*args, *(extra or [])])
    except ServerStartError as e:
        raise SystemExit(f"{e}:\n{e.log}") from None


def rss_mib(server: ServerProcess) -> float:
    """The server's resident memory."""
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_idle(server: ServerProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = httpx.get(server.url + "/health", timeout=5, trust_env=False).json()
        if h["in_flight"] == h["active"] == h["queued"] == 0:
            return
        time.sleep(0.1)
    raise SystemExit(f"the server did not go idle: {h}")


TRIMIX: dict[str, object] = {}  # the requests' "trimix" settings (--weights), else the profile's PPL selection


def stream_once(url: str, prompt: str, tokens: int, hang_up_after: int | None = None) -> Result:
    """One streaming completion; checks the stream's shape, or hangs up after some chunks."""
    body = {
        "prompt": prompt,
        "max_tokens": tokens,
        "stop": [],
        "stream": True,
        "stream_options": {"include_usage": True},
        **({"trimix": TRIMIX} if TRIMIX else {}),
    }
    t0 = time.perf_counter()
    ttft = 0.0
    pieces: list[str] = []
    finish = usage = None
    done = False
    try:
        with (
            httpx.Client(timeout=300, trust_env=False) as c,
            c.stream("POST", url + "/v1/completions", json=body) as r,
        ):
            if r.status_code != 200:
                return Result(False, error=f"HTTP {r.status_code}: {r.read().decode()[:200]}")
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    return Result(False, error=obj["error"]["message"])
                if obj.get("usage"):
                    usage = obj["usage"]
                for ch in obj["choices"]:
                    if ch["text"]:
                        if not pieces:
                            ttft = time.perf_counter() - t0
                        pieces.append(ch["text"])
                    if ch["finish_reason"]:
                        finish = ch["finish_reason"]
                if hang_up_after is not None and len(pieces) >= hang_up_after:
                    return Result(True, len(pieces), ttft, time.perf_counter() - t0, disconnected=True)
    except httpx.HTTPError as e:
        return Result(False, error=f"{type(e).__name__}: {e}")
    seconds = time.perf_counter() - t0
    if not done or finish not in ("stop", "length") or usage is None or usage["completion_tokens"] < len(pieces):
        return Result(False, error=f"incomplete stream (done={done}, finish={finish}, usage={usage})")
    return Result(True, usage["completion_tokens"], ttft, seconds)


def whole_once(url: str, prompt: str, tokens: int) -> Result:
    t0 = time.perf_counter()
    try:
        r = httpx.post(
            url + "/v1/completions",
            json={"prompt": prompt, "max_tokens": tokens, "stop": [], **({"trimix": TRIMIX} if TRIMIX else {})},
            timeout=300,
            trust_env=False,
        )
    except httpx.HTTPError as e:
        return Result(False, error=f"{type(e).__name__}: {e}")
    if r.status_code != 200:
        return Result(False, error=f"HTTP {r.status_code}")
    obj = r.json()
    ok = obj["choices"][0]["finish_reason"] in ("stop", "length") and "weights" in obj["trimix"]
    return Result(ok, obj["usage"]["completion_tokens"], 0.0, time.perf_counter() - t0)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def concurrency(
    server: ServerProcess, clients: int, requests: int, tokens: int, rng: random.Random
) -> dict[str, float]:
    prompts = [rng.choice(PROMPTS) for _ in range(clients * requests)]

    def client(k: int) -> list[Result]:
        return [stream_once(server.url, prompts[k * requests + i], tokens) for i in range(requests)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    good = [r for r in results if r.ok]
    total = sum(r.tokens for r in good)
    timed = [r for r in good if r.tokens]
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": total,
        "aggregate": total / wall,
        "per_client": statistics.mean(r.tokens / r.seconds for r in timed) if timed else 0.0,
        "ttft_p50": pct([r.ttft for r in timed], 0.5),
        "ttft_p95": pct([r.ttft for r in timed], 0.95),
        "errors": len(results) - len(good),
        "wall": wall,
    }


def soak(server: ServerProcess, n: int, rng: random.Random) -> dict[str, float]:
    plans = []
    for _ in range(n):
        kind = rng.random()
        tokens = rng.randint(8, 64)
        if kind < 1 / 3:
            plans.append(("hang-up", rng.choice(PROMPTS), tokens, rng.randint(1, 6)))
        elif kind < 1 / 3 + 1 / 10:
            plans.append(("whole", rng.choice(PROMPTS), tokens, None))
        else:
            plans.append(("stream", rng.choice(PROMPTS), tokens, None))

    def run(plan: tuple[str, str, int, int | None]) -> tuple[str, Result]:
        kind, prompt, tokens, cut = plan
        if kind == "whole":
            return kind, whole_once(server.url, prompt, tokens)
        return kind, stream_once(server.url, prompt, tokens, cut)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, plans))
    wall = time.perf_counter() - t0
    bad = [r for _, r in results if not r.ok]
    for r in bad[:5]:
        print(f"  soak error: {r.error}", file=sys.stderr)
    return {
        "requests": n,
        "hung_up": sum(1 for k, r in results if k == "hang-up" and r.ok),
        "completed": sum(1 for k, r in results if k != "hang-up" and r.ok),
        "errors": len(bad),
        "wall": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--soak", type=int, default=300)
    ap.add_argument("--parallel", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="llama.cpp threads per model (0: every core)")
    ap.add_argument("--weights", help="fixed ALPHA:BETA for every request (default: PPL selection per request)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.weights:
        a, b = (float(x) for x in args.weights.split(":"))
        TRIMIX.update(alpha=a, beta=b)
    rng = random.Random(args.seed)
    levels = [int(x) for x in args.clients.split(",")]
    server = start_demo(args.parallel, 4 * args.parallel, args.threads)
    try:
        for _ in range(2):  # warm-up: the first requests build the UTF-8 guard tables and page in the models
            stream_once(server.url, PROMPTS[0], 8)
        how = f"weights {args.weights}" if args.weights else "PPL selection per request"
        print(
            f"trimix serve --lang demo --parallel {args.parallel} --threads {args.threads}; {args.tokens} tokens, {how}"
        )
        print(
            f"{'clients':>7} {'requests':>8} {'agg tok/s':>10} {'client tok/s':>12} {'TTFT p50':>9} "
            f"{'TTFT p95':>9} {'errors':>6}"
        )
        rows = []
        for c in levels:
            row = concurrency(server, c, args.requests, args.tokens, rng)
            rows.append(row)
            print(
                f"{c:>7} {row['requests']:>8} {row['aggregate']:>10.1f} {row['per_client']:>12.1f} "
                f"{row['ttft_p50']:>8.2f}s {row['ttft_p95']:>8.2f}s {row['errors']:>6}",
                flush=True,
            )
        base = next((r["aggregate"] for r in rows if r["clients"] == 1), None)
        if base:
            for r in rows:
                print(f"  {r['clients']} clients: {r['aggregate'] / base:.2f}x the aggregate of 1 client")
        if args.soak:
            wait_idle(server)
            before = rss_mib(server)
            s = soak(server, args.soak, rng)
            wait_idle(server)
            time.sleep(1.0)
            after = rss_mib(server)
            print(
                f"soak: {s['requests']} requests in {s['wall']:.0f} s, {s['completed']} completed and checked, "
                f"{s['hung_up']} hung up mid-stream, {s['errors']} errors; server RSS {before:.0f} MiB before, "
                f"{after:.0f} MiB after ({after - before:+.1f} MiB)"
            )
    finally:
        rc = server.stop()
        print(f"server stopped (exit code {rc})")


if __name__ == "__main__":
    main()
