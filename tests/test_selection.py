"""Weight selection: exact against a float64 dense reference, one shared prompt evaluation, bounded memory."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
from commands import trimix
from reference import single_logits

import trimix_cpp as tm
from trimix_cpp import selection
from trimix_cpp._llama import LlamaModel
from trimix_cpp.calibrate import load_weights
from trimix_cpp.selection import DEFAULT_GRID, KERNEL_ENV, GridNLL, Selector, parse_grid

PROMPT = "the cat and the dog of the ཀག་ ئۇيغۇر and the man in the house on the hill"
TRIO = ("large_ins", "small_cpt", "small_base")


def all_logits(path, tokens, chunk: int | None = None) -> np.ndarray:
    """Every position's logits of one model alone, float64 (the dense reference's input), decoded in
    chunks of ``chunk`` positions like the selection does (llama.cpp's numerics depend on it)."""
    step = chunk or len(tokens)
    with LlamaModel(path, n_ctx=512, n_gpu_layers=0) as m:
        rows = []
        for s in range(0, len(tokens), step):
            part = tokens[s : s + step]
            m.decode(part, np.ones(len(part), np.int8))
            rows.append(m.logits_rows(len(part)).astype(np.float64))
        return np.concatenate(rows)


def dense_reference(paths, tokens, alphas, betas, chunk=None):
    """Mean NLL per token of every pair, the plain float64 way: fuse, log-softmax, pick targets."""
    A, B, C = (all_logits(paths[r], tokens, chunk)[:-1] for r in TRIO)
    n = min(A.shape[1], B.shape[1], C.shape[1])
    A, B, C = A[:, :n], B[:, :n], C[:, :n]
    targets = tokens[1:]
    out = np.empty((len(alphas), len(betas)))
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            f = a * A + b * B + (1 - a - b) * C
            m = f.max(axis=1, keepdims=True)
            lse = (m + np.log(np.exp(f - m).sum(axis=1, keepdims=True)))[:, 0]
            out[i, j] = np.mean(lse - f[np.arange(len(targets)), targets])
    singles = {}
    for r, X in zip(TRIO, (A, B, C)):
        m = X.max(axis=1, keepdims=True)
        lse = (m + np.log(np.exp(X - m).sum(axis=1, keepdims=True)))[:, 0]
        singles[r] = float(np.mean(lse - X[np.arange(len(targets)), targets]))
    return out, singles


@pytest.fixture(scope="module")
def engine(tiny_trio):
    with tm.Engine({r: tiny_trio[r] for r in TRIO}, tm.LoadOptions(n_ctx=512, n_gpu_layers=0)) as eng:
        yield eng


@pytest.mark.parametrize(
    "alphas,betas",
    [
        (DEFAULT_GRID, DEFAULT_GRID),
        ((0.0, 0.25, 1.5, 2.0), (0.05, 0.6)),  # a common step of 1/20, weights above 1
        ((-0.5, 0.37, 1.13), (0.2, -0.3)),  # no common step, negative weights
    ],
)
def test_ppl_matches_dense_float64_reference(engine, tiny_trio, alphas, betas):
    tokens = engine.tokenize(PROMPT)
    sel = engine.select(tokens, Selector("ppl", alphas, betas))
    ref, singles = dense_reference(tiny_trio, tokens, sel.alphas, sel.betas)
    np.testing.assert_allclose(sel.scores, ref, atol=1e-4, rtol=0)
    for r in TRIO:
        assert sel.single_nll[r] == pytest.approx(singles[r], abs=1e-4)
    i, j = np.unravel_index(np.argmin(ref), ref.shape)
    assert sel.chosen == (sel.alphas[i], sel.betas[j])


@pytest.fixture(params=["numba", "numpy"])
def kernel(request, monkeypatch) -> str:
    """Each reduction kernel in turn, chosen the way a user does (the environment variable); the
    compiled one only where numba is installed (the ``fast`` extra, which ``test`` includes)."""
    if request.param == "numba" and importlib.util.find_spec("numba") is None:
        pytest.skip("numba is not installed (pip install -e '.[fast]')")
    monkeypatch.setenv(KERNEL_ENV, request.param)
    assert selection.resolve_kernel() == request.param
    return request.param


@pytest.mark.parametrize(
    "alphas,betas",
    [
        (DEFAULT_GRID, DEFAULT_GRID),
        ((0.0, 0.25, 1.5, 2.0), (0.05, 0.6)),  # a common step of 1/20, weights above 1
        ((-0.5, 0.37, 1.13), (0.2, -0.3)),  # no common step, negative weights
    ],
)
def test_both_kernels_match_dense_float64_reference(engine, tiny_trio, kernel, alphas, betas):
    """The dense-reference check above, on the compiled kernel and on the numpy fallback alike."""
    tokens = engine.tokenize(PROMPT * 2)
    sel = engine.select(tokens, Selector("ppl", alphas, betas))
    ref, singles = dense_reference(tiny_trio, tokens, sel.alphas, sel.betas)
    np.testing.assert_allclose(sel.scores, ref, atol=1e-4, rtol=0)
    for r in TRIO:
        assert sel.single_nll[r] == pytest.approx(singles[r], abs=1e-4)


def dense_rows(A, B, C, x, alphas, betas):
    """Mean NLL of every pair and of each single model over rows of logits, plainly in float64."""
    A, B, C = (np.asarray(v, dtype=np.float64) for v in (A, B, C))
    rows = np.arange(len(x))
    out = np.empty((len(alphas), len(betas)))
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            f = a * A + b * B + (1 - a - b) * C
            m = f.max(axis=1, keepdims=True)
            out[i, j] = np.mean(m[:, 0] + np.log(np.exp(f - m).sum(axis=1)) - f[rows, x])
    singles = {}
    for role, f in zip(TRIO, (A, B, C)):
        m = f.max(axis=1, keepdims=True)
        singles[role] = float(np.mean(m[:, 0] + np.log(np.exp(f - m).sum(axis=1)) - f[rows, x]))
    return out, singles


@pytest.mark.parametrize(
    "alphas,betas",
    [
        (DEFAULT_GRID, DEFAULT_GRID),
        ((0.0, 0.25, 1.5, 2.0), (0.05, 0.6)),
        ((-0.5, 0.37, 1.13), (0.2, -0.3)),
        ((-2.0, -1.0, 0.5), (0.1, 0.3, 0.5, 0.7, 0.9, 1.1, 1.3, 1.5, 1.7, 1.9)),  # more than 8 weights
        ((0.7,), (0.0,)),  # a single pair, a grid that is only the extra weights
    ],
)
def test_kernels_exact_on_hard_rows(kernel, alphas, betas):
    """Logits far wider than a model's, the three models disagreeing, a vocabulary that ends in a
    partial block, and rows whose sums underflow float32 (recomputed densely): within 1e-4 nats."""
    rng = np.random.default_rng(7)
    n, v = 12, 3001
    A, B, C = (rng.standard_normal((n, v)).astype(np.float32) * s for s in (9.0, 4.0, 12.0))
    C[:, :50] -= 80.0  # entries one model rules out and another favours
    A[:, :50] += 60.0
    C[3, 7], A[3, 7] = -250.0, 250.0  # a shift bound 400 nats above the fused row's maximum
    x = rng.integers(0, v, n)
    x[:4] = [7, 10, 3000, 0]
    with GridNLL(alphas, betas, v) as g:
        assert g.kernel == kernel
        g.add(A[:5], B[:5], C[:5], x[:5])  # two chunks, split unevenly
        g.add(A[5:], B[5:], C[5:], x[5:])
        ref, singles = dense_rows(A, B, C, x, g.alphas, g.betas)
        np.testing.assert_allclose(g.scores.mean_nll, ref, atol=1e-4, rtol=0)
        for r, val in g.scores.single_mean_nll().items():
            assert val == pytest.approx(singles[r], abs=1e-4)
        assert g.scores.n_dense_fallback >= 1  # row 3 underflowed and was recomputed


def test_kernels_agree_on_non_finite_logits(kernel):
    """A NaN or infinite logit sends its row to the dense float64 path on both kernels."""
    rng = np.random.default_rng(3)
    A, B, C = (rng.standard_normal((4, 600)).astype(np.float32) for _ in range(3))
    A[1, 5], C[2, 9] = np.nan, -np.inf
    x = np.array([1, 2, 3, 4])
    with GridNLL(DEFAULT_GRID, DEFAULT_GRID, 600, 1) as g, GridNLL(DEFAULT_GRID, DEFAULT_GRID, 600, 1, "numpy") as ref:
        with np.errstate(invalid="ignore"):  # NaN shifts and dense rows, on this thread (one each)
            g.add(A, B, C, x)
            ref.add(A, B, C, x)
        assert g.scores.n_dense_fallback == ref.scores.n_dense_fallback == 2
        np.testing.assert_allclose(g.scores.mean_nll, ref.scores.mean_nll, equal_nan=True)


def test_compiled_exp_is_accurate_over_the_float32_range():
    """The kernel's own exponential: 3e-7 relative error where exp is a normal float32, and the same
    denormals and zeros as libm's below (float32 products there lose precision on both paths)."""
    if importlib.util.find_spec("numba") is None:
        pytest.skip("numba is not installed (pip install -e '.[fast]')")
    x = np.concatenate([np.linspace(-110.0, 88.0, 1_000_003), [0.0, -0.0, -87.3, -103.9, -104.0, -1e4]])
    x = x.astype(np.float32)
    got = np.empty_like(x)
    selection.compiled_kernel().exp_into(x, got)
    ref = np.exp(x.astype(np.float64))
    normal = ref >= np.finfo(np.float32).tiny
    assert np.max(np.abs(got[normal] / ref[normal] - 1)) < 5e-7
    assert np.max(np.abs(got[~normal] - ref[~normal])) < 1e-44


def test_kernel_choice(monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, "numpy")
    assert GridNLL(DEFAULT_GRID, DEFAULT_GRID, 100).kernel == "numpy"
    monkeypatch.setenv(KERNEL_ENV, "fortran")
    with pytest.raises(tm.TrimixError, match="unknown selection kernel"):
        GridNLL(DEFAULT_GRID, DEFAULT_GRID, 100)
    monkeypatch.delenv(KERNEL_ENV)
    expected = "numba" if importlib.util.find_spec("numba") else "numpy"
    assert GridNLL(DEFAULT_GRID, DEFAULT_GRID, 100).kernel == expected
    if expected == "numba":  # installed but failing to load: the numpy path, on one thread, same sums

        def broken(self):
            raise ImportError("numba built for another numpy")

        monkeypatch.setattr(selection._Compiled, "_load", broken)
        rng = np.random.default_rng(0)
        A, B, C = (rng.standard_normal((3, 100)).astype(np.float32) for _ in range(3))
        with GridNLL(DEFAULT_GRID, DEFAULT_GRID, 100) as g, GridNLL(DEFAULT_GRID, DEFAULT_GRID, 100, 1, "numpy") as ref:
            g.add(A, B, C, np.arange(3))
            ref.add(A, B, C, np.arange(3))
            assert (g.kernel, g.threads) == ("numpy", 1)
            np.testing.assert_allclose(g.scores.mean_nll, ref.scores.mean_nll, atol=1e-12)
        with pytest.raises(ImportError), GridNLL(DEFAULT_GRID, DEFAULT_GRID, 100, kernel="numba") as g:
            g.add(A, B, C, np.arange(3))
    monkeypatch.setattr(selection.importlib.util, "find_spec", lambda name: None)
    assert selection.resolve_kernel() == "numpy"  # numba missing: the numpy path, silently
    with pytest.raises(tm.TrimixError, match="needs numba"):
        selection.resolve_kernel("numba")


def test_chunked_and_unchunked_agree(engine, tiny_trio):
    tokens = engine.tokenize(PROMPT * 3)
    n_vocab = engine.vocab.n_vocab
    tiny_budget = (Selector().scratch_bytes(n_vocab) + 3 * 4 * n_vocab * 3) / 2**20  # three rows per chunk
    assert Selector(max_logits_mib=tiny_budget).chunk_rows(n_vocab, [n_vocab] * 3, 512) == 3
    chunked = engine.select(tokens, Selector("ppl", max_logits_mib=tiny_budget))
    ref, _ = dense_reference(tiny_trio, tokens, chunked.alphas, chunked.betas, chunk=3)
    np.testing.assert_allclose(chunked.scores, ref, atol=1e-4, rtol=0)
    # llama.cpp's own logits move by ~1e-2 between batch sizes, so the whole-prompt run agrees
    # only to that precision; the reduction itself is chunk-exact (next test)
    whole = engine.select(tokens, Selector("ppl"))
    np.testing.assert_allclose(chunked.scores, whole.scores, atol=1e-2)


def test_reduction_is_exact_whatever_the_chunking():
    rng = np.random.default_rng(0)
    A, B, C = (rng.standard_normal((40, 3000)).astype(np.float32) * 4 for _ in range(3))
    x = rng.integers(0, 3000, 40)
    with (
        GridNLL(DEFAULT_GRID, DEFAULT_GRID, 3000, threads=2) as whole,
        GridNLL(DEFAULT_GRID, DEFAULT_GRID, 3000, threads=1) as parts,
    ):
        whole.add(A, B, C, x)
        for s in range(0, 40, 7):
            parts.add(A[s : s + 7], B[s : s + 7], C[s : s + 7], x[s : s + 7])
        np.testing.assert_allclose(parts.scores.mean_nll, whole.scores.mean_nll, atol=1e-9)
        assert parts.scores.n_rows == whole.scores.n_rows == 40


def test_one_shared_prompt_evaluation(engine):
    """Selection and generation evaluate the prompt once per model: count what each decodes."""
    tokens = engine.tokenize(PROMPT)
    before = {r: engine.models[r].n_decoded for r in TRIO}
    gen = engine.generate(tokens, Selector("ppl"), max_tokens=8).run()
    assert gen.finish_reason == "length" and len(gen.token_ids) == 8
    for r in TRIO:
        # the prompt once, then one token per generated token except the last (never fed back)
        assert engine.models[r].n_decoded - before[r] == len(tokens) + 8 - 1
    # and the tokens generated are those of fixed weights at the chosen pair
    a, b = gen.selection.chosen
    fixed = engine.generate(tokens, tm.plan("trimix", alpha=a, beta=b), max_tokens=8).run()
    assert fixed.token_ids == gen.token_ids


def test_ent_equals_an_independent_entropy(engine, tiny_trio):
    tokens = engine.tokenize(PROMPT)
    sel = engine.select(tokens, Selector("ent"))
    A, B, C = (single_logits(tiny_trio[r], tokens) for r in TRIO)  # each model alone, same decode
    for i, a in enumerate(sel.alphas):
        for j, b in enumerate(sel.betas):
            f = a * A + b * B + (1 - a - b) * C
            logp = f - f.max() - np.log(np.exp(f - f.max()).sum())
            h = -np.sum(np.exp(logp) * logp)
            assert sel.scores[i, j] == pytest.approx(h, abs=1e-6)
    i, j = np.unravel_index(np.argmin(sel.scores), sel.scores.shape)
    assert sel.chosen == (sel.alphas[i], sel.betas[j])


def test_ties_break_to_smaller_alpha_then_beta():
    from trimix_cpp.selection import choose

    scores = np.array([[2.0, 1.0, 1.0], [1.0 + 1e-9, 3.0, 1.0]])
    assert choose((0.1, 0.2), (0.1, 0.2, 0.3), scores) == (0.1, 0.2)


@pytest.mark.slow
def test_identical_smollm2_trio_reports_the_single_perplexity_everywhere(smollm2):
    with tm.Engine({r: smollm2 for r in TRIO}, tm.LoadOptions(n_ctx=256)) as eng:
        sel = eng.select("The quick brown fox jumps over the lazy dog. " * 3, Selector("ppl"))
        single = sel.single_nll["small_base"]
        assert sel.single_nll["large_ins"] == pytest.approx(single, abs=1e-5)
        np.testing.assert_allclose(sel.scores, single, atol=1e-4)
        assert sel.chosen == (0.1, 0.1)  # all tied: the smallest alpha, then beta
        assert 1.0 < math.exp(single) < 100.0


@pytest.mark.slow
def test_gemma_selection_matches_dense_reference(gemma):
    """The 262,144-token vocabulary, including the factorised sums and their threads."""
    with tm.Engine({r: gemma for r in TRIO}, tm.LoadOptions(n_ctx=256)) as eng:
        tokens = eng.tokenize("བོད་ཀྱི་ལོ་རྒྱུས་ནི་ ᠮᠣᠩᠭᠣᠯ and the river")
        sel = eng.select(tokens, Selector("ppl"))
        X = all_logits(gemma, tokens)[:-1]
        m = X.max(axis=1, keepdims=True)
        lse = (m + np.log(np.exp(X - m).sum(axis=1, keepdims=True)))[:, 0]
        single = float(np.mean(lse - X[np.arange(len(tokens) - 1), tokens[1:]]))
        np.testing.assert_allclose(sel.scores, single, atol=1e-4)


def test_parse_grid_and_bad_grids():
    assert parse_grid("0.5, 0.1,0.5") == (0.1, 0.5)
    for bad in ("", "a,b", "nan,0.1", "inf"):
        with pytest.raises(tm.WeightError):
            parse_grid(bad)
    with pytest.raises(tm.WeightError):
        Selector("bogus")


def _trio_args(trio):
    return [f"--{r.replace('_', '-')}={trio[r]}" for r in TRIO]


@pytest.mark.slow
def test_cli_select_json_contract(tiny_trio):
    r = trimix("select", "--json", *_trio_args(tiny_trio), "--n-ctx", "256", PROMPT)
    assert r.returncode == 0, r.stderr.decode()
    out = json.loads(r.stdout)
    assert out["strategy"] == "ppl" and set(out["chosen"]) == {"alpha", "beta"}
    assert len(out["grid"]) == 36 and set(out["grid"][0]) == {"alpha", "beta", "nll", "ppl"}
    assert out["grid"][0]["ppl"] == pytest.approx(math.exp(out["grid"][0]["nll"]))
    assert set(out["single_ppl"]) == set(TRIO)
    best = min(out["grid"], key=lambda c: c["nll"])
    assert (best["alpha"], best["beta"]) == (out["chosen"]["alpha"], out["chosen"]["beta"])
    table = trimix("select", *_trio_args(tiny_trio), "--n-ctx", "256", PROMPT).stdout.decode()
    assert "alpha" in table and "*" in table and "single models' perplexity" in table


@pytest.mark.slow
def test_cli_generate_with_ppl_selection(tiny_trio):
    r = trimix("generate", "--json", *_trio_args(tiny_trio), "--n-ctx", "256", "-n", "6", PROMPT)
    out = json.loads(r.stdout)
    chosen = out["selection"]["chosen"]
    assert out["weights"]["large_ins"] == chosen["alpha"] and out["weights"]["small_cpt"] == chosen["beta"]


@pytest.mark.slow
def test_calibration_writes_reloads_and_rejects_other_models(tiny_trio, tmp_path):
    prompts = tmp_path / "task.jsonl"
    lines = [json.dumps({"prompt": f"the cat {i} and the dog", "id": i}) for i in range(12)]
    prompts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "w.json"
    r = trimix(
        "calibrate",
        "--prompts",
        str(prompts),
        "--n",
        "5",
        "--seed",
        "0",
        "-o",
        str(out),
        *_trio_args(tiny_trio),
        "--n-ctx",
        "128",
    )
    assert r.returncode == 0, r.stderr.decode()
    saved = json.loads(out.read_text())
    assert saved["n_prompts"] == 5 and len(saved["grid"]) == 36 and saved["strategy"] == "ppl"
    assert saved["models"]["small_cpt"]["file"] == "small_cpt.gguf"
    paths = {r: tiny_trio[r] for r in TRIO}
    assert load_weights(out, paths) == (saved["chosen"]["alpha"], saved["chosen"]["beta"])
    # the mean over the sample equals the mean of per-prompt selections
    import random

    sample = random.Random(0).sample([json.loads(x)["prompt"] for x in lines], 5)
    with tm.Engine(paths, tm.LoadOptions(n_ctx=128, n_gpu_layers=0)) as eng:
        mean = sum(eng.select(p, Selector()).scores for p in sample) / 5
    # rel 1e-6: the command may reduce with the compiled kernel and this process with numpy (numba
    # not importable here), whose float32 sums agree to about 1e-8
    assert [c["nll"] for c in saved["grid"]] == pytest.approx(mean.ravel().tolist(), rel=1e-6)
    g = trimix("generate", "--json", "--weights-from", str(out), *_trio_args(tiny_trio), "-n", "3", "the cat")
    assert json.loads(g.stdout)["weights"]["large_ins"] == saved["chosen"]["alpha"]
    # a weights file made for other models is refused
    other = dict(paths, small_cpt=tiny_trio["large_base"])
    with pytest.raises(tm.TrimixError, match="calibrated for small_cpt"):
        load_weights(out, other)
    bad = trimix(
        "generate",
        "--weights-from",
        str(out),
        "--large-ins",
        str(tiny_trio["large_ins"]),
        "--small-cpt",
        str(tiny_trio["large_base"]),
        "--small-base",
        str(tiny_trio["small_base"]),
        "x",
    )
    assert bad.returncode == 1 and "calibrated for small_cpt" in bad.stderr.decode()


def test_calibration_reports_malformed_prompt_lines(tiny_trio, tmp_path):
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n', encoding="utf-8")
    r = trimix("calibrate", "--prompts", str(prompts), *_trio_args(tiny_trio), "-o", str(tmp_path / "w.json"))
    err = r.stderr.decode()
    assert r.returncode == 1 and "bad.jsonl:2" in err and "prompt" in err
