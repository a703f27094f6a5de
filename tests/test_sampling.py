"""The sampler on synthetic logits: support of each filter, and frequencies that match softmax."""

from __future__ import annotations

import numpy as np
import pytest
from reference import llama_sampler_probs

import trimix_cpp as tm


def _draw(params: tm.SamplingParams, logits: np.ndarray, n: int = 4000) -> np.ndarray:
    sample = tm.make_sampler(params, len(logits))
    return np.array([sample(logits.copy()) for _ in range(n)])


LOGITS = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02], dtype=np.float32))


def test_greedy_is_argmax():
    assert tm.make_sampler(tm.SamplingParams(), 7)(LOGITS.copy()) == 0


def test_frequencies_follow_the_softmax():
    draws = _draw(tm.SamplingParams(temperature=1.0, seed=1), LOGITS, 20000)
    freq = np.bincount(draws, minlength=7) / len(draws)
    np.testing.assert_allclose(freq, np.exp(LOGITS) / np.exp(LOGITS).sum(), atol=0.015)


def test_temperature_flattens():
    hot = np.bincount(_draw(tm.SamplingParams(temperature=5.0, seed=2), LOGITS), minlength=7)
    cold = np.bincount(_draw(tm.SamplingParams(temperature=0.3, seed=2), LOGITS), minlength=7)
    assert hot[6] > cold[6] and cold[0] > hot[0]


@pytest.mark.parametrize(
    "params,support",
    [
        (tm.SamplingParams(temperature=1.0, top_k=3, seed=3), {0, 1, 2}),
        (tm.SamplingParams(temperature=1.0, top_p=0.6, seed=3), {0, 1}),  # 0.4 < 0.6 <= 0.65
        (tm.SamplingParams(temperature=1.0, min_p=0.3, seed=3), {0, 1, 2}),  # >= 0.12
        (tm.SamplingParams(temperature=1.0, top_k=1, seed=3), {0}),
    ],
)
def test_filters_restrict_the_support(params, support):
    assert set(_draw(params, LOGITS, 3000).tolist()) == support


def test_masked_tokens_are_never_drawn():
    logits = LOGITS.copy()
    logits[0] = -np.inf
    assert 0 not in set(_draw(tm.SamplingParams(temperature=2.0, seed=4), logits, 2000).tolist())


@pytest.mark.parametrize(
    "bad", [dict(temperature=-1), dict(top_p=0), dict(min_p=1.0), dict(top_k=-2), dict(temperature=float("nan"))]
)
def test_bad_parameters(bad):
    with pytest.raises(tm.TrimixError):
        tm.make_sampler(tm.SamplingParams(**bad), 7)


@pytest.mark.parametrize(
    "top_k,top_p,min_p,temperature",
    [
        (0, 1.0, 0.0, 0.7),
        (40, 1.0, 0.0, 1.0),
        (0, 0.9, 0.0, 0.7),
        (0, 1.0, 0.05, 1.5),
        (50, 0.8, 0.02, 0.5),
        (0, 0.5, 0.0, 3.0),  # top-p judged before the temperature flattens the distribution
        (200, 0.95, 0.1, 2.0),  # min-p after top-p, both at temperature 1
    ],
)
def test_same_distribution_as_llama_cpp_sampler_chain(top_k, top_p, min_p, temperature):
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal(3000) * 3.0).astype(np.float32)
    sampler = tm.sampling.TokenSampler(
        tm.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=1), len(logits)
    )
    ours = sampler.distribution(logits).astype(np.float64)
    ref = llama_sampler_probs(logits, top_k, top_p, min_p, temperature)
    assert set(np.flatnonzero(ours)) == set(np.flatnonzero(ref))
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_a_tiny_temperature_is_greedy_not_nan():
    logits = LOGITS.copy()
    for t in (1e-40, 1e-300, 5e-324):
        draws = _draw(tm.SamplingParams(temperature=t, seed=5), logits, 50)
        assert set(draws.tolist()) == {0}


@pytest.mark.parametrize(
    "bad", [dict(seed=-1), dict(seed=2**64), dict(top_k=1.5), dict(temperature=True), dict(temperature=1e309)]
)
def test_bad_seed_and_types(bad):
    with pytest.raises(tm.TrimixError):
        tm.make_sampler(tm.SamplingParams(**{"temperature": 1.0, **bad}), 7)
