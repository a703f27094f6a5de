"""Fusion against independent references, on tiny models through real llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import log_softmax, reference_greedy, single_logits

import trimix_cpp as tm
from trimix_cpp.fusion import Fuser

PROMPT = "the cat and the ཀག་ ئۇيغۇر"
TRIO = ("large_ins", "small_cpt", "small_base")


@pytest.fixture(scope="module")
def engine4(tiny_trio):
    with tm.Engine(tiny_trio, tm.LoadOptions(n_ctx=512, n_gpu_layers=0)) as eng:
        yield eng


@pytest.mark.parametrize(
    "method,kw",
    [
        ("trimix", {"alpha": 0.1, "beta": 0.9}),
        ("trimix", {"alpha": 0.7, "beta": 1.0}),  # third weight negative, as the paper's grid allows
        ("trimix4", {"alpha": 0.3, "beta": 0.5, "gamma": 0.2}),
        ("proxy", {}),
        ("single", {"role": "small_cpt"}),
    ],
)
def test_fused_logits_equal_weighted_sum_of_separate_models(engine4, tiny_trio, method, kw):
    fusion = tm.plan(method, **kw)
    tokens = engine4.tokenize(PROMPT)
    engine4.evaluate_prompt(tokens)
    rows = {r: engine4.models[r].logits_row(-1) for r in fusion.roles}
    fused = Fuser(fusion, engine4.vocab.n_vocab).fuse(rows).astype(np.float64)
    expected = sum(w * single_logits(tiny_trio[r], tokens) for r, w in fusion.weights.items())
    np.testing.assert_allclose(fused, expected, rtol=1e-5, atol=1e-4)


def test_weights_follow_the_papers_equations():
    w = tm.plan("trimix", alpha=0.1, beta=0.9).weights
    assert w == pytest.approx({"large_ins": 0.1, "small_cpt": 0.9, "small_base": 0.0})
    # Eq. 1: SB + a(LI - LB) + b(SC - SB) + g(LB - SB); with g = a it is Eq. 5.
    w4 = tm.plan("trimix4", alpha=0.3, beta=0.5, gamma=0.3).weights
    assert w4 == pytest.approx({"large_ins": 0.3, "small_cpt": 0.5, "small_base": 0.2, "large_base": 0.0})
    assert tm.plan("proxy").weights == {"large_ins": 1.0, "small_cpt": 1.0, "small_base": -1.0}
    c = tm.plan("contrastive")
    assert c.weights == {"small_cpt": 1.5, "small_base": -0.5} and c.plausibility_role == "small_cpt"
    assert tm.plan("single", role="small_base").roles == ("small_base",)
    assert tm.plan("contrastive").roles == ("small_cpt", "small_base")


def _proxy(b):
    return lambda r: r["large_ins"] + b * (r["small_cpt"] - r["small_base"])


def _contrastive(b):
    def f(r):
        sc, sb = r["small_cpt"], r["small_base"]
        out = sc + b * (sc - sb)
        p = np.exp(sc - sc.max())
        out[p < 0.1 * p.max()] = -np.inf
        return out

    return f


@pytest.mark.parametrize(
    "method,kw,formula",
    [
        ("proxy", {}, _proxy(1.0)),
        ("proxy", {"beta": 0.4}, _proxy(0.4)),
        ("contrastive", {}, _contrastive(0.5)),
        ("contrastive", {"beta": 1.5}, _contrastive(1.5)),
        (
            "trimix",
            {"alpha": 0.3, "beta": 0.9},
            lambda r: 0.3 * r["large_ins"] + 0.9 * r["small_cpt"] - 0.2 * r["small_base"],
        ),
    ],
)
def test_greedy_generation_equals_formula(engine4, tiny_trio, method, kw, formula):
    fusion = tm.plan(method, **kw)
    gen = engine4.generate(PROMPT, fusion, max_tokens=24, utf8_guard=False).run()
    paths = {r: tiny_trio[r] for r in fusion.roles}
    expected = reference_greedy(paths, engine4.tokenize(PROMPT), formula, len(gen.token_ids), engine4.vocab.banned)
    assert gen.token_ids == expected
    assert len(gen.token_ids) == 24


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=st.floats(-1.5, 2.5), b=st.floats(-1.5, 2.5))
def test_three_identical_models_reproduce_the_single_model(identical_engine, a, b):
    """Law: with weights summing to 1, fusing one model with itself changes nothing."""
    eng, tokens, single = identical_engine
    fusion = tm.plan("trimix", alpha=a, beta=b)
    eng.evaluate_prompt(tokens)
    rows = {r: eng.models[r].logits_row(-1) for r in TRIO}
    fused = Fuser(fusion, eng.vocab.n_vocab).fuse(rows)
    scale = abs(a) + abs(b) + abs(1 - a - b)
    np.testing.assert_allclose(log_softmax(fused), log_softmax(single), atol=2e-5 * scale * 10)


@pytest.fixture(scope="module")
def identical_engine(tiny_trio):
    path = tiny_trio["small_cpt"]
    with tm.Engine({r: path for r in TRIO}, tm.LoadOptions(n_ctx=256, n_gpu_layers=0)) as eng:
        tokens = eng.tokenize(PROMPT)
        yield eng, tokens, single_logits(path, tokens)


def test_identical_models_greedy_token_for_token(identical_engine):
    eng, _, _ = identical_engine
    single = eng.generate(PROMPT, tm.plan("single", role="small_cpt"), max_tokens=40).run()
    fused = eng.generate(PROMPT, tm.plan("trimix", alpha=0.3, beta=0.5), max_tokens=40).run()
    assert fused.token_ids == single.token_ids
    assert fused.text == single.text


def test_only_the_models_a_method_needs_are_required(tiny_trio):
    with tm.Engine(
        {"small_cpt": tiny_trio["small_cpt"], "small_base": tiny_trio["small_base"]},
        tm.LoadOptions(n_ctx=128, n_gpu_layers=0),
    ) as eng:
        gen = eng.generate("the", tm.plan("contrastive"), max_tokens=4).run()
        assert len(gen.token_ids) == 4
        with pytest.raises(tm.WeightError, match="large_ins"):
            eng.generate("the", tm.plan("proxy"))
