"""The library and the command line under the re-audit's inputs: an engine shared by threads, the
smallest context, one-token calibration prompts, hostile batch files, and errors that used to be raw.

Anything that could crash the process runs in a subprocess, so a regression fails a test instead of
the test run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from commands import trimix

import trimix_cpp as tm
from trimix_cpp._llama import MAX_SEQ, MIN_N_CTX
from trimix_cpp.batch import read_batch
from trimix_cpp.calibrate import calibrate

ROOT = Path(__file__).resolve().parent.parent
OPTS = tm.LoadOptions(n_ctx=64, n_gpu_layers=0)


def trio_args(trio: dict[str, Path], roles=("large_ins", "small_cpt", "small_base")) -> list[str]:
    out = []
    for r in roles:
        out += ["--" + r.replace("_", "-"), str(trio[r])]
    return out


def one_line_error(r: subprocess.CompletedProcess, needle: str) -> str:
    err = r.stderr.decode()
    assert r.returncode == 1, (r.returncode, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], err
    assert "Traceback" not in err
    return lines[0]


def run_python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


# -- one Engine, two threads ----------------------------------------------------------------------------

_THREADS = """
import sys, threading
import trimix_cpp as tm
from trimix_cpp.profiles import find_profile

fusion = tm.plan("trimix", alpha=0.3, beta=0.7)
prompts = ["ئالاقەداشنى ئۆچۈرۈش", "ھۆججەتنى ساقلاش"]
with tm.Engine(find_profile("demo").paths(), tm.LoadOptions(n_ctx=256, n_seq=2, n_gpu_layers=0)) as engine:
    alone = [engine.generate(p, fusion, max_tokens=16).run().token_ids for p in prompts]
    sel_alone = [engine.select(p, tm.Selector("ppl")).chosen for p in prompts]
    results, failures = [[], []], []
    start = threading.Barrier(2)

    def work(i):
        try:
            start.wait()
            for _ in range(2):
                gen = engine.generate(prompts[i], fusion, max_tokens=16)
                chosen = engine.select(prompts[i], tm.Selector("ppl")).chosen
                results[i].append((list(gen), gen.token_ids, chosen))
        except BaseException as e:
            failures.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    for i in range(2):
        for pieces, ids, chosen in results[i]:
            assert ids == alone[i], (i, ids, alone[i])
            assert chosen == sel_alone[i]
    print("ok")
"""


@pytest.mark.slow
def test_one_engine_used_from_two_threads():
    """Two threads generate and select on one Engine at once: the lock makes them take turns, so the
    process survives (it used to die with a signal) and each gets what it gets alone."""
    r = run_python(_THREADS, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stdout, r.stderr[-2000:])


def test_the_engine_lock_is_documented_and_reentrant(tiny_trio):
    assert "lock" in (tm.Engine.__doc__ or "") and "thread" in (tm.engine.__doc__ or "").lower()
    with tm.Engine({"large_ins": tiny_trio["large_ins"]}, OPTS) as eng:
        with eng.lock:  # a caller may hold it across several calls of its own
            out = eng.generate("the cat", tm.plan("single"), max_tokens=4).run()
        assert len(out.token_ids) == 4


# -- the smallest context ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_n_ctx_1_is_refused_before_llama_cpp_sees_it(tiny_trio):
    assert MIN_N_CTX == 2
    r = trimix("generate", *trio_args(tiny_trio), "--alpha", "0.1", "--beta", "0.9", "--n-ctx", "1", "the")
    one_line_error(r, "--n-ctx must be a whole number from 2")
    with pytest.raises(tm.TrimixError, match=r"^n_ctx must be a whole number from 2"):
        tm.LoadOptions(n_ctx=1)


@pytest.mark.slow
def test_n_ctx_2_is_the_measured_minimum():
    """One prompt token and one generated token: the smallest context that works, end to end (the
    demo trio adds no BOS, so "The" is one token)."""
    r = trimix(
        "generate", "--lang", "demo", "--alpha", "0.1", "--beta", "0.9", "--n-ctx", "2", "-n", "4", "--json", "The"
    )
    assert r.returncode == 0, r.stderr.decode()
    out = json.loads(r.stdout)
    assert out["timings"]["prompt_tokens"] == 1
    assert len(out["token_ids"]) >= 1 and out["finish_reason"] == "context"


def test_a_cache_with_fewer_cells_than_sequences_is_an_error_not_an_abort(tiny_trio):
    """llama.cpp aborts (GGML_ASSERT n_outputs_max) creating a context whose cache has fewer cells than
    sequences; the model wrapper refuses it first."""
    code = textwrap.dedent(f"""
        from trimix_cpp._llama import LlamaModel
        from trimix_cpp.errors import TrimixError
        try:
            LlamaModel({str(tiny_trio["large_ins"])!r}, n_ctx=2, n_seq=3, kv_cells=2, n_gpu_layers=0, isolated=False)
        except TrimixError as e:
            print("refused:", e)
        shared = dict(n_gpu_layers=0, isolated=False)
        with LlamaModel({str(tiny_trio["large_ins"])!r}, n_ctx=2, n_seq=3, kv_cells=3, **shared) as m:
            print("loaded", m.kv_cells)
    """)
    r = run_python(code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "refused: a KV cache of 2 cells cannot hold 3 sequences" in r.stdout and "loaded 3" in r.stdout


@pytest.mark.slow
def test_serve_refuses_n_ctx_1_before_listening(tiny_trio):
    r = trimix("serve", *trio_args(tiny_trio), "--port", "0", "--n-ctx", "1")
    line = one_line_error(r, "--n-ctx must be a whole number from 2")
    assert "listening" not in r.stderr.decode() + line


@pytest.mark.slow
@pytest.mark.parametrize("value", ["-1", "0", "1"])
def test_models_check_refuses_a_context_out_of_range(value):
    r = trimix("models", "check", "--lang", "demo", "--n-ctx", value)
    one_line_error(r, "--n-ctx must be a whole number from 2")
    assert "KV cache @" not in r.stdout.decode()


# -- --parallel's range ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_parallel_messages_give_the_real_range(tiny_trio, tmp_path):
    batch = tmp_path / "p.txt"
    batch.write_text("the\n", encoding="utf-8")
    base = ["generate", *trio_args(tiny_trio), "--alpha", "0.1", "--beta", "0.9", "--batch", str(batch)]
    for bad in (str(MAX_SEQ), "0"):
        one_line_error(trimix(*base, "--parallel", bad), f"--parallel must be a whole number from 1 to {MAX_SEQ - 1}")
    with tm.Engine({"large_ins": tiny_trio["large_ins"]}, tm.LoadOptions(n_ctx=4, n_seq=MAX_SEQ - 1)) as eng:
        assert eng.scheduler.n_seq == MAX_SEQ - 1  # the top of the stated range loads


# -- calibration and one-token prompts -----------------------------------------------------------------------


def test_calibration_leaves_out_one_token_prompts(tiny_trio):
    """A one-token prompt has no perplexity; its entropy used to be added to the others' mean NLL."""
    sel = tm.Selector("ppl", (0.1, 0.5, 1.0), (0.1, 0.5, 1.0))
    with tm.Engine(tiny_trio, OPTS) as eng:
        one = eng.tokenize("t")[:1]  # the tiny models add BOS: a prompt of BOS alone is one token
        prompts = [eng.tokenize(t) for t in ("the cat sat", "and the dog ran", "of the")]
        prompts.insert(1, one)
        cal = calibrate(eng, prompts, [sel, tm.Selector("ent", sel.alphas, sel.betas)], tiny_trio)
        per_prompt = [eng.select(p, sel).scores for p in prompts if len(p) > 1]
    ppl = cal["ppl"]
    assert ppl.n_prompts == 3 and ppl.n_short == 1
    np.testing.assert_allclose(ppl.scores, np.mean(per_prompt, axis=0), rtol=1e-6)
    assert ppl.as_dict()["n_short"] == 1
    assert cal["ent"].n_prompts == 4 and cal["ent"].n_short == 0  # the entropy of one token is an entropy


def test_calibration_of_only_one_token_prompts_says_so(tiny_trio):
    with tm.Engine(tiny_trio, OPTS) as eng:
        one = eng.tokenize("t")[:1]
        with pytest.raises(tm.TrimixError, match="two tokens a perplexity needs"):
            calibrate(eng, [one, one], tm.Selector("ppl", (0.1, 1.0), (0.1, 1.0)), tiny_trio)


@pytest.mark.slow
def test_calibrate_command_counts_one_token_prompts(tmp_path):
    """The demo trio adds no BOS: "The" is a one-token prompt (the prompts file starts with a BOM too)."""
    prompts = tmp_path / "p.jsonl"
    lines = [json.dumps({"prompt": p}, ensure_ascii=False) for p in ["ئالاقەداشنى ئۆچۈرۈش", "The", "ھۆججەتنى ساقلاش"]]
    prompts.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "w.json"
    r = trimix(
        "calibrate", "--lang", "demo", "--prompts", str(prompts), "-o", str(out), "--n-ctx", "128",
        "--grid-alpha", "0.1,1", "--grid-beta", "0.1,1",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr.decode()
    assert "over 2 prompts" in r.stderr.decode() and "1 of one token" in r.stderr.decode()
    assert json.loads(out.read_text())["n_short"] == 1


# -- batch files --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_deeply_nested_batch_line_fails_alone(tiny_trio, tmp_path):
    batch = tmp_path / "b.jsonl"
    lines = [json.dumps({"prompt": "the cat"}), "[" * 100_000, json.dumps({"prompt": "of the"})]
    batch.write_text("\n".join(lines) + "\n", encoding="utf-8")
    r = trimix("generate", *trio_args(tiny_trio), "--alpha", "0.1", "--beta", "0.9", "-n", "3", "--batch", str(batch))
    assert r.returncode == 1, r.stderr.decode()
    assert "Traceback" not in r.stderr.decode() and "RecursionError" not in r.stderr.decode()
    out = [json.loads(x) for x in r.stdout.decode().splitlines()]
    assert [o["line"] for o in out] == [1, 2, 3]
    assert "nested too deeply" in out[1]["error"] and "b.jsonl:2" in out[1]["error"]
    assert "error" not in out[0] and "error" not in out[2] and len(out[2]["token_ids"]) == 3


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_a_batch_file_with_a_bom_keeps_its_first_line(tmp_path, suffix):
    path = tmp_path / f"b{suffix}"
    body = ['{"prompt": "first"}', '{"prompt": "second"}'] if suffix == ".jsonl" else ["first", "second"]
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(body).encode() + b"\n")
    lines = read_batch(path)
    assert [(b.line, b.prompt, b.error) for b in lines] == [(1, "first", None), (2, "second", None)]


# -- --draft's wording ----------------------------------------------------------------------------------------


def test_draft_help_promises_the_distribution_not_the_text():
    from typer.main import get_command

    from trimix_cli.main import app

    gen = get_command(app).commands["generate"]
    (draft,) = [p for p in gen.params if "--draft" in getattr(p, "opts", ())]
    assert "Same output as 0" not in draft.help
    assert "distribution" in draft.help and "not the same text" in draft.help
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "The output is exactly that of `--draft 0`" not in readme
    assert "gives different text with and without drafting" in readme


# -- errors that used to be raw -----------------------------------------------------------------------------------


def _task(tmp_path: Path) -> Path:
    task = tmp_path / "task.jsonl"
    task.write_text(
        "\n".join(json.dumps({"id": str(i), "input": f"the {w}", "gold": w}) for i, w in enumerate(["cat", "dog"]))
        + "\n",
        encoding="utf-8",
    )
    return task


@pytest.mark.slow
def test_eval_plot_into_a_missing_folder_is_refused_before_the_run(tiny_trio, tmp_path):
    out = tmp_path / "run"
    r = trimix(
        "eval", str(_task(tmp_path)), *trio_args(tiny_trio), "--methods", "large-ins", "--out", str(out),
        "--n-ctx", "128", "-n", "2", "--plot", str(tmp_path / "missing" / "p.png"),
    )  # fmt: skip
    one_line_error(r, "the folder")
    assert "--plot" in r.stderr.decode() and not out.exists()  # nothing ran


@pytest.mark.slow
def test_eval_without_sacrebleu_names_the_extra_before_the_run(tiny_trio, tmp_path):
    out = tmp_path / "run"
    args = [
        "eval", str(_task(tmp_path)), *trio_args(tiny_trio), "--methods", "large-ins", "--out", str(out),
        "--n-ctx", "128", "-n", "2",
    ]  # fmt: skip
    # sacrebleu made unimportable in this process only, as when the [eval] extra is not installed
    code = f"import sys; sys.modules['sacrebleu'] = None; sys.argv = ['trimix', *{args!r}]\n"
    code += "from trimix_cli.main import main; main()"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
    line = one_line_error(r, "needs sacrebleu")
    assert "trimix[eval]" in line and not (out / "predictions.jsonl").exists()


def test_models_list_with_a_folder_named_like_a_profile(tmp_path):
    (tmp_path / "X.toml").mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "trimix_cli.main", "models", "list"],
        capture_output=True,
        timeout=120,
        env={**__import__("os").environ, "TRIMIX_PROFILES": str(tmp_path)},
    )
    err = r.stderr.decode()
    assert r.returncode == 0 and "Traceback" not in err and "IsADirectoryError" not in err, err
    assert "X.toml is a folder, not a profile file" in " ".join(err.split())
    assert "demo" in r.stdout.decode()


def test_eval_draft_with_methods_that_cannot_draft_is_refused(tiny_trio, tmp_path):
    out = tmp_path / "run"
    r = trimix(
        "eval", str(_task(tmp_path)), *trio_args(tiny_trio), "--methods", "large-ins,small-cpt,contrastive",
        "--out", str(out), "--n-ctx", "128", "-n", "2", "--draft", "4",
    )  # fmt: skip
    one_line_error(r, "--draft lets the small models draft")
    assert not out.exists()


def test_a_huge_temperature_warns_nothing(tiny_trio):
    """T = 1e308 makes 1/T underflow float32 to 0; -inf * 0 used to be a NaN and a RuntimeWarning."""
    with tm.Engine({"large_ins": tiny_trio["large_ins"]}, OPTS) as eng, warnings.catch_warnings():
        warnings.simplefilter("error")
        g = eng.generate(
            "the cat", tm.plan("single"), sampling=tm.SamplingParams(temperature=1e308, seed=1), max_tokens=16
        ).run()
    assert len(g.token_ids) == 16
    r = trimix(
        "generate", *trio_args(tiny_trio, ("large_ins",)), "--method", "single", "--temperature", "1e308",
        "-n", "8", "--n-ctx", "64", "the",
    )  # fmt: skip
    assert r.returncode == 0 and "RuntimeWarning" not in r.stderr.decode(), r.stderr.decode()
