"""trimix bench on the demo trio: every field measured, the recommendation consistent with them,
the time budget honoured, and bad numbers refused with one line."""

from __future__ import annotations

import json

import pytest
from commands import trimix

pytestmark = pytest.mark.slow  # every test here takes over a second (see README, Tests)

FAST = ["--prompt-tokens", "32", "--tokens", "8", "--drafts", "2", "--parallel", "1,2"]


def test_bench_json_fields_and_recommendation():
    r = trimix("bench", "--lang", "demo", "--json", "--threads", "1", *FAST)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out["prompt_tokens_per_s"]) == {"large_ins", "small_cpt", "small_base", "ppl_selection"}
    assert set(out["decode_tokens_per_s"]) == {"large_ins", "small_cpt", "small_base", "fused"}
    assert all(v > 0 for v in out["decode_tokens_per_s"].values())
    assert set(out["parallel_tokens_per_s"]) == {"1", "2"} and set(out["draft_tokens_per_s"]) == {"2"}
    assert out["skipped"] == []
    rec = out["recommended"]
    assert rec["threads"] == 1 and rec["parallel"] in (1, 2) and rec["draft"] in (0, 2)
    if rec["draft"] == 2:
        assert out["draft_tokens_per_s"]["2"] >= 1.05 * out["decode_tokens_per_s"]["fused"]
    assert abs(sum(out["fused_weights"].values()) - 1.0) < 1e-9


def test_bench_time_budget_skips_what_does_not_fit():
    r = trimix("bench", "--lang", "demo", "--json", "--threads", "1", "--time", "0.001", *FAST)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["decode_tokens_per_s"] == {} and "decode fused" in out["skipped"]


def test_bench_refuses_nonsense():
    for args, msg in (
        (["--parallel", "0"], "--parallel takes whole numbers from 1"),
        (["--drafts", "x"], "--drafts takes comma-separated whole numbers"),
        (["--time", "-1"], "--time must be a positive number"),
        (["--tokens", "0"], "--tokens takes whole numbers from 1"),
    ):
        r = trimix("bench", "--lang", "demo", *args)
        stderr = r.stderr.decode()
        assert r.returncode == 1 and msg in stderr and len(stderr.strip().splitlines()) == 1, stderr
