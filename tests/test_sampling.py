"""The sampler on synthetic logits: support of each filter, and frequencies that match softmax."""

from __future__ import annotations

import numpy as np
import pytest

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
