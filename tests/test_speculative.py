"""Speculative fused decoding gives exactly what plain fused decoding gives.

Greedy: the same tokens for every draft length, compared up to the first step whose top-two fused
margin is within llama.cpp's batch-layout noise (a token's logits can differ slightly between a
batch of one and the verify batch of k + 1; measured 0.0 here on the CPU build with these models,
allowed up to ``LAYOUT_NOISE``). Sampling: the distribution of a token produced by a speculative
round matches the fused distribution exactly (an exact-count chi-square test that fails when the
acceptance rule is broken).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from commands import trimix
from reference import single_logits

import trimix_cpp as tm
from trimix_cpp import speculative
from trimix_cpp.speculative import draft_plan
from trimix_cpp.utf8 import ACCEPT

TRIO = ("large_ins", "small_cpt", "small_base")
LAYOUT_NOISE = 1e-3
DEMO = {"small_cpt": "models/demo/small-cpt.gguf", "small_base": "models/demo/small-base.gguf"}


def opts(n_seq: int = 1, n_ctx: int = 512) -> tm.LoadOptions:
    return tm.LoadOptions(n_ctx=n_ctx, n_gpu_layers=0, n_seq=n_seq)


def _greedy(eng: tm.Engine, prompt: str, fusion: tm.FusionPlan, draft: int, n: int, stop=()) -> tm.Generation:
    margins: list[float] = []

    def observe(gen, rows, fused):
        finite = fused[np.isfinite(fused)]
        top = np.partition(finite, -2)[-2:]
        margins.append(float(top[1] - top[0]))

    eng.scheduler.observer = observe
    gen = eng.generate(prompt, fusion, max_tokens=n, draft=draft, stop=stop)
    pieces = list(gen)
    assert "".join(pieces) == gen.text
    gen.margins = margins  # type: ignore[attr-defined]
    return gen


def test_draft_plan_moves_the_large_weight_onto_small_cpt():
    d = draft_plan(tm.plan("trimix", alpha=0.3, beta=0.6))
    assert d is not None and d.weights == pytest.approx({"small_cpt": 0.9, "small_base": 0.1})
    assert draft_plan(tm.plan("proxy")).weights == pytest.approx({"small_cpt": 2.0, "small_base": -1.0})
    assert draft_plan(tm.plan("contrastive")) is None  # no large model to spare
    assert draft_plan(tm.plan("single")) is None  # no small model to draft with


@pytest.mark.slow
@pytest.mark.parametrize("which", ["tiny", "demo"])
def test_greedy_draft_equals_plain_for_every_k(which, tiny_trio, smollm2):
    if which == "tiny":
        paths, prompt = {r: tiny_trio[r] for r in TRIO}, "the cat sat"
    else:
        paths, prompt = {"large_ins": smollm2, **DEMO}, "ئالاقەداشنى ئۆچۈرۈش"
    plans = [tm.plan("trimix", alpha=0.3, beta=0.7), tm.plan("trimix", alpha=0.1, beta=1.0), tm.plan("proxy")]
    with tm.Engine(paths, opts()) as eng:
        for fusion in plans:
            plain = _greedy(eng, prompt, fusion, 0, 24)
            k_ok = next((k for k, m in enumerate(plain.margins) if m <= LAYOUT_NOISE), len(plain.token_ids))
            assert k_ok >= 8, "prompt too close to a tie to compare"
            for k in (1, 2, 3, 5, 8):
                spec = _greedy(eng, prompt, fusion, k, 24)
                assert spec.token_ids[:k_ok] == plain.token_ids[:k_ok], (fusion.method, fusion.weights, k)
                if k_ok == len(plain.token_ids):
                    assert spec.text == plain.text and spec.finish_reason == plain.finish_reason
                assert spec.timings.draft_tokens >= spec.timings.accepted_tokens >= 0


@pytest.mark.slow
def test_drafts_stop_where_plain_decoding_stops(smollm2):
    paths = {"large_ins": smollm2, **DEMO}
    fusion = tm.plan("trimix", alpha=0.1, beta=1.0)
    prompt = "ئالاقەداشنى ئۆچۈرۈش"
    with tm.Engine(paths, opts(n_ctx=64)) as eng:
        plain = _greedy(eng, prompt, fusion, 0, 30)
        # a stop string in the middle of what plain decoding writes
        cut = plain.text[len(plain.text) // 2 : len(plain.text) // 2 + 2]
        for stop in ([cut], ["\n"]):
            want = _greedy(eng, prompt, fusion, 0, 30, stop=stop)
            for k in (1, 3, 8):
                got = _greedy(eng, prompt, fusion, k, 30, stop=stop)
                assert (got.text, got.finish_reason, got.token_ids) == (want.text, want.finish_reason, want.token_ids)
        # max_tokens inside a round
        for n in (1, 2, 5, 7):
            want = _greedy(eng, prompt, fusion, 0, n)
            got = _greedy(eng, prompt, fusion, 4, n)
            assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason == "length"
        # the end of the context inside a round
        want = _greedy(eng, prompt, fusion, 0, 200)
        got = _greedy(eng, prompt, fusion, 8, 200)
        assert want.finish_reason == "context" and got.token_ids == want.token_ids and got.finish_reason == "context"


def _chi2_crit(df: int, p: float = 1e-4) -> float:
    """Upper quantile of chi-square (Wilson-Hilferty), enough for a pass/fail threshold."""
    z = {1e-4: 3.719, 1e-3: 3.090}[p]
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _second_token_counts(paths, prompt, fusion, params, draft, seeds):
    counts: dict[tuple[int, int], int] = {}
    with tm.Engine(paths, opts(n_ctx=128)) as eng:
        for seed in seeds:
            sp = tm.SamplingParams(**{**params, "seed": seed})
            g = eng.generate(prompt, fusion, sampling=sp, max_tokens=5, draft=draft).run()
            if len(g.token_ids) >= 2:
                key = (g.token_ids[0], g.token_ids[1])
                counts[key] = counts.get(key, 0) + 1
    return counts


def _exact_second_token(paths, prompt_ids, fusion, params, first: int, eng: tm.Engine) -> np.ndarray:
    """The fused sampling distribution of the second token after ``first``, from each model alone."""
    toks = [*prompt_ids, first]
    n = eng.vocab.n_vocab
    rows = {r: single_logits(paths[r], toks, n_ctx=128)[:n] for r in fusion.roles}
    fused = sum(w * rows[r] for r, w in fusion.weights.items()).astype(np.float32)
    guard = eng.guard(True)
    state = guard.advance(ACCEPT, first)
    guard.apply(fused, state)
    return tm.sampling.TokenSampler(tm.SamplingParams(**params, seed=0), n).distribution(fused).astype(np.float64)


def _chi2(paths, prompt, fusion, params, counts) -> tuple[float, int]:
    with tm.Engine(paths, opts(n_ctx=128)) as eng:
        prompt_ids = eng.tokenize(prompt).tolist()
        by_first: dict[int, dict[int, int]] = {}
        for (a, b), c in counts.items():
            by_first.setdefault(a, {})[b] = by_first.setdefault(a, {}).get(b, 0) + c
        stat, df = 0.0, 0
        for first, seconds in by_first.items():
            total = sum(seconds.values())
            p = _exact_second_token(paths, prompt_ids, fusion, params, first, eng)
            expected = total * p
            big = expected >= 5
            obs = np.zeros_like(p)
            for b, c in seconds.items():
                obs[b] = c
            assert obs[p == 0].sum() == 0, "a token outside the fused support was produced"
            o = np.append(obs[big], obs[~big].sum())
            e = np.append(expected[big], expected[~big].sum())
            keep = e > 0
            stat += float((((o - e) ** 2)[keep] / e[keep]).sum())
            df += int(keep.sum()) - 1
    return stat, max(df, 1)


PARAMS = {"temperature": 1.3, "top_k": 0, "top_p": 0.95, "min_p": 0.0}


@pytest.mark.slow
def test_sampled_drafts_keep_the_fused_distribution(tiny_trio):
    paths = {r: tiny_trio[r] for r in TRIO}
    fusion = tm.plan("trimix", alpha=0.4, beta=0.5)
    prompt = "ཀག་"  # Tibetan: the tiny vocabulary spells parts of it in byte tokens, so the guard acts
    counts = _second_token_counts(paths, prompt, fusion, PARAMS, 3, range(1500))
    stat, df = _chi2(paths, prompt, fusion, PARAMS, counts)
    assert stat < _chi2_crit(df), (stat, df)


@pytest.mark.slow
def test_the_distribution_test_catches_a_broken_acceptance_rule(tiny_trio, monkeypatch):
    """Control: accepting every drafted token (the drafter's distribution, not the fused one) fails."""
    original = speculative._verify

    def accept_all(sched, s, p, large):
        s.drafter.q[:] = 1e-30  # p(x) / q(x) huge: every drafted token is accepted
        original(sched, s, p, large)

    monkeypatch.setattr(speculative, "_verify", accept_all)
    paths = {r: tiny_trio[r] for r in TRIO}
    fusion = tm.plan("trimix", alpha=0.4, beta=0.5)
    counts = _second_token_counts(paths, "ཀག་", fusion, PARAMS, 3, range(1500))
    stat, df = _chi2(paths, "ཀག་", fusion, PARAMS, counts)
    assert stat > _chi2_crit(df), (stat, df)


@pytest.mark.slow
def test_cli_draft_flag_and_json_counts(tiny_trio):
    args = [f"--{r.replace('_', '-')}={tiny_trio[r]}" for r in TRIO] + ["--alpha", "0.2", "--beta", "0.8"]

    plain = json.loads(trimix("generate", *args, "-n", "12", "--json", "the cat").stdout)
    r = trimix("generate", *args, "-n", "12", "--json", "--draft", "4", "the cat")
    assert r.returncode == 0, r.stderr.decode()
    out = json.loads(r.stdout)
    assert out["token_ids"] == plain["token_ids"]
    t = out["timings"]
    assert t["draft_tokens"] > 0 and t["draft_tokens"] == t["accepted_tokens"] + t["rejected_tokens"]
    bad = trimix("generate", *args, "--draft", "99", "the cat")
    assert bad.returncode == 1 and "--draft must be a whole number from 0" in bad.stderr.decode()
    small = [f"--{r.replace('_', '-')}={tiny_trio[r]}" for r in TRIO[1:]]
    r = trimix("generate", *small, "--method", "contrastive", "--draft", "2", "the cat")
    assert r.returncode == 1 and "--draft" in r.stderr.decode() and "no large model" in r.stderr.decode()
