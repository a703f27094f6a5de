"""Repetition penalties and log-probabilities of the fused distribution, against llama.cpp's own samplers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from reference import llama_penalties, llama_sampler_probs, log_softmax, reference_greedy

import trimix_cpp as tm
from trimix_cpp.methods import sampling_params
from trimix_cpp.sampling import Penalties, TokenSampler

PROMPT = "the cat and the cat and the"


@pytest.mark.parametrize(
    "last_n,repeat,freq,present",
    [(64, 1.3, 0.0, 0.0), (8, 1.0, 0.5, 0.0), (16, 1.0, 0.0, 0.7), (-1, 1.15, 0.2, 0.3), (3, 0.8, -0.4, 0.1)],
)
def test_penalties_match_llama_cpp(last_n, repeat, freq, present):
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal(500) * 3.0).astype(np.float32)
    history = rng.integers(0, 40, 90).tolist()  # repeats, and tokens that left a short window
    params = tm.SamplingParams(
        repeat_penalty=repeat, repeat_last_n=last_n, frequency_penalty=freq, presence_penalty=present
    )
    pen = Penalties(params, n_ctx=256, history=np.asarray(history[:50]))
    for t in history[50:]:
        pen.push(t)
    ours = logits.copy()
    pen.apply(ours)
    ref = llama_penalties(logits, history, 256 if last_n < 0 else last_n, repeat, freq, present)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
    assert (ours != logits).any()


@pytest.mark.parametrize("top_k,top_p,min_p,temperature", [(0, 1.0, 0.0, 0.8), (40, 0.9, 0.02, 1.3)])
def test_penalties_then_filters_then_temperature_as_llama_cpp(top_k, top_p, min_p, temperature):
    rng = np.random.default_rng(11)
    logits = (rng.standard_normal(2000) * 3.0).astype(np.float32)
    history = rng.integers(0, 2000, 300).tolist()
    params = tm.SamplingParams(temperature, top_k, top_p, min_p, 1, 1.4, 64, 0.3, 0.2)
    pen = Penalties(params, 512, np.asarray(history))
    penalised = logits.copy()
    pen.apply(penalised)
    ours = TokenSampler(params, len(logits)).distribution(penalised).astype(np.float64)
    ref = llama_sampler_probs(logits, top_k, top_p, min_p, temperature, (history, 64, 1.4, 0.3, 0.2))
    assert set(np.flatnonzero(ours)) == set(np.flatnonzero(ref))
    np.testing.assert_allclose(ours, ref, atol=1e-6)


@pytest.fixture(scope="module")
def trio_engine(tiny_trio):
    paths = {r: tiny_trio[r] for r in ("large_ins", "small_cpt", "small_base")}
    with tm.Engine(paths, tm.LoadOptions(n_ctx=512, n_gpu_layers=0, n_threads=1)) as eng:
        yield eng, paths


def test_generation_applies_penalties_to_the_fused_logits(trio_engine):
    eng, paths = trio_engine
    a, b = 0.4, 0.5
    sampling = sampling_params(repeat_penalty=1.5, repeat_last_n=12, frequency_penalty=0.4, presence_penalty=-3.0)
    gen = eng.generate(PROMPT, tm.plan("trimix", alpha=a, beta=b), sampling=sampling, max_tokens=24, utf8_guard=False)
    gen.run()
    plain = eng.generate(PROMPT, tm.plan("trimix", alpha=a, beta=b), max_tokens=24, utf8_guard=False).run()

    def formula(rows):
        return a * rows["large_ins"] + b * rows["small_cpt"] + (1 - a - b) * rows["small_base"]

    def penalise(fused, history):
        return llama_penalties(fused, history, 12, 1.5, 0.4, -3.0).astype(np.float64)

    tokens = eng.tokenize(PROMPT)
    expected = reference_greedy(paths, tokens, formula, len(gen.token_ids), eng.vocab.banned, process=penalise)
    assert gen.token_ids == expected
    assert gen.token_ids != plain.token_ids  # the penalties changed something


def test_logprobs_are_the_fused_log_softmax(trio_engine):
    eng, _ = trio_engine
    seen: list[np.ndarray] = []
    eng.scheduler.observer = lambda g, rows, fused: seen.append(fused.astype(np.float64))
    try:
        fusion = tm.plan("trimix", alpha=0.3, beta=0.6)
        gen = eng.generate_many(PROMPT, [tm.SeqSpec(fusion, max_tokens=6, utf8_guard=False, logprobs=3)])[0].run()
    finally:
        eng.scheduler.observer = None
    assert len(gen.logprobs) == len(gen.token_ids) == 6
    for lp, tok, fused in zip(gen.logprobs, gen.token_ids, seen):
        fused[eng.vocab.banned] = -np.inf  # never-generated tokens (padding, controls) have no probability
        ref = log_softmax(fused)
        assert lp.token == tok
        assert lp.logprob == pytest.approx(ref[tok], abs=1e-4)
        assert [t for t, _ in lp.top] == np.argsort(-ref, kind="stable")[:3].tolist()
        assert [v for _, v in lp.top] == pytest.approx(np.sort(ref)[::-1][:3], abs=1e-4)
        assert lp.top[0][0] == tok  # greedy picks the most likely token
    out = gen.as_dict()["logprobs"]
    assert out[0]["id"] == gen.token_ids[0] and math.isclose(out[0]["logprob"], gen.logprobs[0].logprob)
    assert len(out[0]["top_logprobs"]) == 3 and isinstance(out[0]["bytes"], list)


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(repeat_penalty=0.0), "^repeat_penalty"),
        (dict(repeat_penalty=float("inf")), "^repeat_penalty"),
        (dict(repeat_penalty=1.1, repeat_last_n=-2), "^repeat_last_n"),
        (dict(frequency_penalty=float("nan")), "^frequency_penalty"),
        (dict(presence_penalty=1e9), "^presence_penalty"),
        (dict(repeat_last_n=32), "none is given"),
    ],
)
def test_bad_penalties_are_refused(kw, msg):
    with pytest.raises(tm.TrimixError, match=msg):
        sampling_params(**kw)


def test_draft_refuses_penalties_and_logprobs(trio_engine):
    eng, _ = trio_engine
    fusion = tm.plan("trimix", alpha=0.5, beta=0.5)
    with pytest.raises(tm.TrimixError, match="repetition penalties"):
        eng.generate(PROMPT, fusion, sampling=sampling_params(repeat_penalty=1.2), draft=2)
    with pytest.raises(tm.TrimixError, match="logprobs"):
        eng.generate_many(PROMPT, [tm.SeqSpec(fusion, draft=2, logprobs=0)])


def test_batch_lines_take_penalties_and_logprobs(trio_engine, tmp_path):
    from trimix_cpp.batch import BatchDefaults, line_spec, read_batch, run_batch
    from trimix_cpp.methods import MethodChoice

    eng, _ = trio_engine
    f = tmp_path / "b.jsonl"
    f.write_text(
        '{"prompt": "the cat", "max_tokens": 4, "logprobs": 2, "repeat_penalty": 1.4, "repeat_last_n": 8}\n'
        '{"prompt": "the cat", "max_tokens": 4, "frequency_penalty": "x"}\n'
        '{"prompt": "the cat", "max_tokens": 4, "repeat_last_n": 8}\n',
        encoding="utf-8",
    )
    defaults = BatchDefaults(MethodChoice(method="trimix", alpha=0.5, beta=0.5))
    results = list(run_batch(eng, read_batch(f), lambda s: line_spec(defaults, s), lambda p: p, f.name))
    first = results[0].as_dict()
    assert len(first["logprobs"]) == len(first["token_ids"]) and len(first["logprobs"][0]["top_logprobs"]) == 2
    assert "frequency_penalty has the wrong type" in results[1].error
    assert "--repeat-last-n sets the window" in results[2].error
    spec = line_spec(defaults, {"repeat_penalty": 1.4, "repeat_last_n": 8})
    assert spec.sampling.repeat_penalty == 1.4 and spec.sampling.repeat_last_n == 8
