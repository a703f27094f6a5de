"""Perplexity of long texts under several methods from one evaluation per model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from commands import trimix
from hypothesis import given
from hypothesis import strategies as st
from reference import log_softmax

import trimix_cpp as tm
from trimix_cpp._llama import LlamaModel
from trimix_cpp.scoring import windows

TEXT = "the cat and the dog of the ཀག་ ئۇيغۇر and the man in the house on the hill " * 5
TRIO = ("large_ins", "small_cpt", "small_base")


@given(n=st.integers(1, 3000), w=st.integers(2, 600))
def test_windows_score_every_token_exactly_once(n, w):
    scored = []
    for start, end, first_new in windows(n, w):
        assert end - start <= w
        scored += [p for p in range(start + 1, end) if p >= first_new]
    assert scored == list(range(1, n))


def test_perplexity_matches_each_model_alone_and_fused_formula(tiny_trio):
    paths = {r: tiny_trio[r] for r in TRIO}
    plans = {"li": tm.plan("single"), "tm": tm.plan("trimix", alpha=0.3, beta=0.5)}
    with tm.Engine(paths, tm.LoadOptions(n_ctx=512, n_gpu_layers=0)) as eng:
        scores, grid = eng.perplexity(TEXT, plans, grid=tm.Selector())
        n = len(eng.tokenize(TEXT)) - 1
    logits = {}
    for r in TRIO:
        with LlamaModel(paths[r], n_ctx=512, n_gpu_layers=0) as m:
            toks = m.tokenize(TEXT, True)
            m.decode(toks, np.ones(len(toks), np.int8))
            logits[r] = m.logits_rows(len(toks)).astype(np.float64)[:-1]
    targets = toks[1:]

    def nll(rows):
        return float(np.mean([-log_softmax(rows[i])[targets[i]] for i in range(len(targets))]))

    assert scores["li"].n_tokens == n == len(targets)
    assert scores["li"].nll == pytest.approx(nll(logits["large_ins"]), abs=1e-4)
    fused = 0.3 * logits["large_ins"] + 0.5 * logits["small_cpt"] + 0.2 * logits["small_base"]
    assert scores["tm"].nll == pytest.approx(nll(fused), abs=1e-4)
    assert grid.mean_nll[1, 2] == pytest.approx(scores["tm"].nll, abs=1e-4)  # alpha 0.3, beta 0.5


def test_windowed_perplexity_scores_the_same_tokens(tiny_trio):
    with tm.Engine({"large_ins": tiny_trio["large_ins"]}, tm.LoadOptions(n_ctx=512, n_gpu_layers=0)) as eng:
        whole, _ = eng.perplexity(TEXT, {"li": tm.plan("single")})
        small, _ = eng.perplexity(TEXT, {"li": tm.plan("single")}, window=48)
    assert whole["li"].n_tokens == small["li"].n_tokens
    assert abs(whole["li"].nll - small["li"].nll) < 1.0  # less context, same tokens


@pytest.mark.slow
def test_cli_ppl_json(tiny_trio, tmp_path):
    f = tmp_path / "held.txt"
    f.write_text(TEXT, encoding="utf-8")
    args = [f"--{r.replace('_', '-')}={tiny_trio[r]}" for r in TRIO]
    r = trimix("ppl", str(f), *args, "--methods", "small-cpt,trimix@0.1:0.9,trimix-grid", "--json", "--n-ctx", "512")
    assert r.returncode == 0, r.stderr.decode()
    rows = json.loads(r.stdout)["methods"]
    assert [x["method"] for x in rows][:2] == ["small-cpt", "trimix@0.1:0.9"]
    assert rows[2]["method"].startswith("trimix-ppl@") and rows[2]["ppl"] <= rows[1]["ppl"] + 1e-9
    bad = trimix("ppl", str(f), *args, "--methods", "magic")
    assert bad.returncode == 1 and "unknown method 'magic'" in bad.stderr.decode()
