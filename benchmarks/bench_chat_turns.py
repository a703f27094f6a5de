"""A conversation's later turns against its first: time to first token per turn, with and without the
server keeping each conversation in the KV cache.

Starts ``trimix serve --lang demo`` (chat through SmolLM2's chat template, the profile's PPL
selection, which scores the whole prompt every turn) and holds one ``--turns``-turn conversation
over ``/v1/chat/completions``, streamed: each turn sends every earlier message and the replies the
server wrote, as a chat client does. Printed per turn: the prompt's length, how many of its tokens
the server found cached (``trimix.timings.cached_tokens``), and the time from sending the request to
its first text. Then the same with ``--no-keep-conversations``.

    python benchmarks/bench_chat_turns.py [--turns 10] [--tokens 24] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import PROMPTS, Server  # noqa: E402


def converse(url: str, turns: int, tokens: int) -> list[tuple[int, int, float]]:
    """(prompt tokens, cached tokens, seconds to the first text) for each turn of one conversation."""
    messages: list[dict[str, str]] = []
    out = []
    for k in range(turns):
        messages.append({"role": "user", "content": PROMPTS[k % len(PROMPTS)]})
        body = {"messages": messages, "max_tokens": tokens, "stop": [], "stream": True}
        body["stream_options"] = {"include_usage": True}
        t0 = time.perf_counter()
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
                    if piece:
                        first = first or time.perf_counter()
                        text += piece
        messages.append({"role": "assistant", "content": text})
        ttft = (first or time.perf_counter()) - t0
        out.append((usage.get("prompt_tokens", 0), int(info.get("timings", {}).get("cached_tokens", 0)), ttft))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    results = {}
    for keep in (True, False):
        extra = [] if keep else ["--no-keep-conversations"]
        server = Server(2, 4, args.threads, extra)
        try:
            warm = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
            httpx.post(server.url + "/v1/chat/completions", json=warm, timeout=600, trust_env=False)  # first-use costs
            results[keep] = converse(server.url, args.turns, args.tokens)
        finally:
            server.stop()
    print("| turn | prompt tokens | cached, kept | TTFT kept (s) | TTFT not kept (s) |")
    print("|---|---|---|---|---|")
    for k, ((n, cached, t), (_, _, t_off)) in enumerate(zip(results[True], results[False]), 1):
        print(f"| {k} | {n} | {cached} | {t:.3f} | {t_off:.3f} |")
    first, last = results[True][0][2], results[True][-1][2]
    off_first, off_last = results[False][0][2], results[False][-1][2]
    print(f"\nturn {args.turns} / turn 1: kept {last / first:.2f}x, not kept {off_last / off_first:.2f}x")


if __name__ == "__main__":
    main()
