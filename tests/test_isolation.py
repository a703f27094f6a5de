"""No request changes another's output: a request that ends while another continues, in the library,
the batch command and the server, greedy, token for token against the same request alone.

What broke: with one KV cache shared by every sequence, the cells a finished request frees are reused
by the requests that continue, so their cells come in another order than alone; llama.cpp's CPU flash
attention sums cells in cell order with a half-precision accumulator, and the continuing request's
logits moved by 0.5-1.7 (SmolLM2-135M), enough to change "...321 million people" into "...311
million". Each sequence now has a cache of its own and attention runs without that kernel, which
makes a sequence's logits bit-for-bit those it has alone: the library test compares them exactly.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from commands import trimix

import trimix_cpp as tm
from trimix_cpp.engine import SeqSpec
from trimix_cpp.profiles import find_profile

pytestmark = pytest.mark.slow  # every test here takes over a second (see README, Tests)

A = "The capital of France is"
OTHERS = (  # prompts of other lengths, ending after 2, 6 and 13 tokens while A goes on
    ("Once upon a time, in a small village by the sea, there lived an old fisherman who", 2),
    ("ئالاقەداشنى ئۆچۈرۈش مەغلۇپ بولدى", 6),
    ("def fibonacci(n):\n    if n < 2:\n        return n\n    return", 13),
)
N_A = 40


@pytest.fixture(scope="module")
def demo_paths() -> dict[str, str]:
    profile = find_profile("demo")
    return {r: str(profile.locate(r)) for r in ("large_ins", "small_cpt", "small_base")}


def _run(paths: dict[str, str], isolated: bool, with_others: bool) -> tuple[list[int], list[np.ndarray]]:
    """Request A (PPL selection, greedy) alone or with three shorter requests decoding beside it, which
    start a few steps after A and end long before it; A's tokens and its fused logits at every step."""
    options = tm.LoadOptions(n_ctx=512, n_seq=4, n_gpu_layers=0, isolated=isolated, n_threads=1)
    with tm.Engine(paths, options) as eng:
        rows: list[np.ndarray] = []
        a = eng.generate(A, tm.Selector("ppl"), max_tokens=N_A)
        eng.scheduler.observer = lambda gen, _rows, fused: rows.append(fused.copy()) if gen is a else None
        for _ in range(3):
            eng.scheduler.step()
        others = [eng.generate(p, tm.plan("trimix", alpha=0.5, beta=0.5), max_tokens=n) for p, n in OTHERS]
        if not with_others:
            for g in others:
                g.close()
        eng.run([a, *others])
        assert a.finish_reason == "length"
        if with_others:
            assert [g.finish_reason for g in others] == ["length"] * 3
        return a.token_ids, rows


def test_a_request_that_ends_leaves_the_one_that_continues_bit_identical(demo_paths):
    alone_tokens, alone_rows = _run(demo_paths, isolated=True, with_others=False)
    tokens, rows = _run(demo_paths, isolated=True, with_others=True)
    assert tokens == alone_tokens
    assert len(rows) == len(alone_rows) == N_A
    for step, (x, y) in enumerate(zip(rows, alone_rows)):
        assert np.array_equal(x, y), f"step {step}: fused logits moved by {np.abs(x - y).max():.3g}"


def test_the_shared_cache_does_move_them(demo_paths):
    """The control: with one shared cache (what evaluation uses, where every sequence of an item
    continues one prompt) the same run moves A's logits, so the test above can fail."""
    _, alone_rows = _run(demo_paths, isolated=False, with_others=False)
    _, rows = _run(demo_paths, isolated=False, with_others=True)
    moved = max(float(np.abs(x - y).max()) for x, y in zip(rows, alone_rows))
    assert moved > 1e-3, "the shared cache no longer moves a continuing sequence's logits: llama.cpp changed"


def test_batch_command_lines_equal_each_alone(tmp_path):
    prompts = [(A, N_A), *OTHERS]
    batch = tmp_path / "prompts.jsonl"
    batch.write_text(
        "".join(json.dumps({"prompt": p, "max_tokens": n}, ensure_ascii=False) + "\n" for p, n in prompts),
        encoding="utf-8",
    )
    r = trimix("generate", "--lang", "demo", "--threads", "1", "--batch", str(batch), "--parallel", "4")
    assert r.returncode == 0, r.stderr
    together = [json.loads(line) for line in r.stdout.splitlines()]
    for (p, n), out in zip(prompts, together):
        alone = json.loads(trimix("generate", "--lang", "demo", "--threads", "1", "-n", str(n), "--json", p).stdout)
        assert out["token_ids"] == alone["token_ids"], p
        assert out["weights"] == alone["weights"], p


def test_server_request_that_ends_beside_another(tmp_path):
    from serving import start_server

    server = start_server("--lang", "demo", "--parallel", "4")
    try:

        def complete(prompt: str, n: int) -> dict:
            body = {"prompt": prompt, "max_tokens": n, "stop": [], "temperature": 0}
            r = httpx.post(server.url + "/v1/completions", json=body, timeout=300)
            assert r.status_code == 200, r.text
            return r.json()

        alone = complete(A, N_A)
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(4) as pool:
            first = pool.submit(complete, A, N_A)
            rest = [pool.submit(complete, p, n) for p, n in OTHERS]
            together = first.result()
            for f in rest:
                assert f.result()["choices"][0]["finish_reason"] == "length"
        assert together["choices"][0]["text"] == alone["choices"][0]["text"]
        assert together["choices"][0]["finish_reason"] == alone["choices"][0]["finish_reason"] == "length"
    finally:
        assert server.stop() == 0, server.log()
    assert "Traceback" not in server.log()


def test_single_engine_generations_in_sequence_and_side_by_side_agree(demo_paths):
    """Two requests in one engine, one after the other and then side by side, with the second one
    submitted after the first has started: the same tokens either way (the cache a sequence id held
    before is emptied and refilled exactly as a fresh one)."""
    options = tm.LoadOptions(n_ctx=256, n_seq=2, n_gpu_layers=0, n_threads=1)
    spec = SeqSpec(tm.plan("trimix", alpha=0.3, beta=0.7), max_tokens=24)
    with tm.Engine(demo_paths, options) as eng:
        one = [eng.generate_many(p, [spec])[0].run().token_ids for p in (A, OTHERS[1][0])]
        a = eng.generate_many(A, [spec])[0]
        eng.scheduler.step()
        b = eng.generate_many(OTHERS[1][0], [spec])[0]
        eng.run([a, b])
        assert [a.token_ids, b.token_ids] == one
