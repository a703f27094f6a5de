"""A conversation's later turns against its first: time to first token per turn, with and without the
server keeping each conversation in the KV cache.

Starts ``trimix serve --lang demo`` (chat through SmolLM2's chat template, the profile's PPL
selection, which scores the whole prompt every turn) and holds one ``--turns``-turn conversation
over ``/v1/chat/completions``, streamed: each turn sends every earlier message and the replies the
server wrote, as a chat client does. Printed per turn: the prompt's length, how many of its tokens
the server found cached (``trimix.timings.cached_tokens``), the time from sending the request to
its first text, and the CPU time the server process spent in that interval (read from /proc: on a
busy machine the wall time mostly measures the other work, the CPU time still measures this
server's), each the least of ``--repeats`` conversations. Then the same with
``--no-keep-conversations``.

    python benchmarks/bench_chat_turns.py [--turns 10] [--tokens 24] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import PROMPTS, start_demo


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def converse(url: str, pid: int, turns: int, tokens: int, rep: int) -> list[tuple[int, int, float, float]]:
    """(prompt tokens, cached tokens, seconds to the first text, server CPU seconds to the first text)
    for each turn of one conversation; ``rep`` numbers its system message, so that no conversation
    finds another's turns in the cache."""
    messages: list[dict[str, str]] = [{"role": "system", "content": f"Conversation {rep}."}]
    out = []
    for k in range(turns):
        messages.append({"role": "user", "content": PROMPTS[k % len(PROMPTS)]})
        body = {"messages": messages, "max_tokens": tokens, "stop": [], "stream": True}
        body["stream_options"] = {"include_usage": True}
        t0 = time.perf_counter()
        c0, c1 = cpu_seconds(pid), None
        first = None
        text, info, usage = "", {}, {}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600, trust_env=False) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                info = chunk.get("trimix") or info
                for c in chunk.get("choices", []):
                    piece = c.get("delta", {}).get("content")
                    if piece and first is None:
                        first, c1 = time.perf_counter(), cpu_seconds(pid)
                    if piece:
                        text += piece
        messages.append({"role": "assistant", "content": text})
        ttft = (first or time.perf_counter()) - t0
        cpu = (c1 if c1 is not None else cpu_seconds(pid)) - c0
        out.append((usage.get("prompt_tokens", 0), int(info.get("timings", {}).get("cached_tokens", 0)), ttft, cpu))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="conversations per setting (the least time per turn)")
    args = ap.parse_args()
    results = {}
    for keep in (True, False):
        extra = [] if keep else ["--no-keep-conversations"]
        server = start_demo(2, 4, args.threads, extra)
        try:
            warm = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
            httpx.post(server.url + "/v1/chat/completions", json=warm, timeout=600, trust_env=False)  # first-use costs
            runs = [converse(server.url, server.proc.pid, args.turns, args.tokens, r) for r in range(args.repeats)]
            # per turn, the least of the repeats: the run least disturbed by other work on the machine
            results[keep] = [
                (runs[0][k][0], runs[0][k][1], min(r[k][2] for r in runs), min(r[k][3] for r in runs))
                for k in range(args.turns)
            ]
        finally:
            server.stop()
    head = ["turn", "prompt tokens", "cached, kept", "TTFT kept (s)", "CPU kept (s)", "TTFT not kept (s)"]
    print("| " + " | ".join([*head, "CPU not kept (s)"]) + " |")
    print("|---|---|---|---|---|---|---|")
    for k, ((n, cached, t, c), (_, _, t_off, c_off)) in enumerate(zip(results[True], results[False]), 1):
        print(f"| {k} | {n} | {cached} | {t:.3f} | {c:.2f} | {t_off:.3f} | {c_off:.2f} |")
    for i, what in ((2, "TTFT"), (3, "CPU to first token")):
        kept, off = results[True], results[False]
        print(
            f"{what}, turn {args.turns} / turn 1: kept {kept[-1][i] / kept[0][i]:.2f}x, "
            f"not kept {off[-1][i] / off[0][i]:.2f}x"
        )


if __name__ == "__main__":
    main()
