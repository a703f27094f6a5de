"""trimix eval's run folder end to end: stale settings refused, one process per folder, bad numbers,
items that do not fit, likelihood scoring past eight options, and the shared benchmark files."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from commands import models, run_eval, trimix

import trimix_cpp as tm
from trimix_cpp.evaluation.folder import LOCK, MANIFEST, PREDICTIONS, RunDir
from trimix_cpp.evaluation.items import Item
from trimix_cpp.evaluation.predict import GenerationSettings, Runner, SettingsError, Task

GRID = ["--grid-alpha", "0.1,1", "--grid-beta", "0.1,1"]
CLI = "trimix_cli.main" if importlib.util.find_spec("trimix_cli") else "cli.main"  # the module of `trimix`
SHARED = Path(os.environ.get("TRIMIX_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def task_file(path: Path, n: int = 4, word: str = "cat") -> Path:
    lines = [json.dumps({"id": f"t{i}", "input": f"the {word} {i}:", "gold": "the dog"}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def one_line_error(r: subprocess.CompletedProcess) -> str:
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def started(tiny_trio, tmp_path):
    """A finished one-item run whose methods depend on the grid and the calibration."""
    task = task_file(tmp_path / "task.jsonl")
    out = tmp_path / "run"
    base = [str(task), "--out", str(out), *models(tiny_trio), "-n", "4", "--n-ctx", "256", "--shots", "0"]
    base += ["--methods", "large-ins,trimix-ppl,trimix-ppl-task", "--calibration-n", "2", *GRID]
    r = run_eval([*base, "--limit", "1"])
    assert r.returncode == 0, r.stderr.decode()
    return task, out, base


def replace_option(args: list[str], flag: str, value: str) -> list[str]:
    i = args.index(flag)
    return [*args[: i + 1], value, *args[i + 2 :]]


@pytest.mark.slow
def test_resume_refuses_each_kind_of_change(started, tiny_trio, tmp_path):
    task, out, base = started
    before = (out / PREDICTIONS).read_bytes()
    other_model = tmp_path / "other.gguf"
    shutil.copy(tiny_trio["large_base"], other_model)
    changes = [
        (replace_option(base, "--shots", "1"), "shots 0 -> 1"),
        (replace_option(base, "-n", "5"), "max_tokens 4 -> 5"),
        ([*base, "--mc-mode", "score"], 'mc_mode "generate" -> "score"'),
        (replace_option(base, "--n-ctx", "512"), "n_ctx 256 -> 512"),
        (replace_option(base, "--grid-alpha", "0.1,0.5"), "method trimix-ppl: grid_alpha 0.1,1 -> 0.1,0.5"),
        (replace_option(base, "--calibration-n", "3"), "method trimix-ppl-task: calibration_n 2 -> 3"),
        (
            [a.replace(str(tiny_trio["small_cpt"]), str(other_model)) for a in base],
            "model small_cpt small_cpt.gguf",
        ),
    ]
    for args, needle in changes:
        started_at = time.monotonic()
        err = one_line_error(run_eval(args))
        assert needle in err and "-> " in err and f"delete {out} to start over" in err, (needle, err)
        assert time.monotonic() - started_at < 60
    # the same model file under another name is another identity too (the name is part of it)
    assert "other.gguf" in one_line_error(run_eval(changes[-1][0]))

    # another task file under the same name (jsonl:task)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = task_file(elsewhere / "task.jsonl", word="dog")
    err = one_line_error(run_eval([moved.as_posix() if a == str(task) else a for a in base]))
    assert "task jsonl:task task.jsonl (" in err and "sha256" in err

    # what no option changes: the stop strings, the calibration seed, the prompt format
    manifest = json.loads((out / MANIFEST).read_text())
    for section, key, value, needle in [
        ("settings", "stop", ["."], 'stop ["."] -> ["\\n"]'),
        ("settings", "prompt_format", "1:old", "prompt_format"),
    ]:
        edited = json.loads(json.dumps(manifest))
        edited[section][key] = value
        (out / MANIFEST).write_text(json.dumps(edited))
        assert needle in one_line_error(run_eval(base))
    edited = json.loads(json.dumps(manifest))
    edited["methods"]["trimix-ppl-task"]["calibration_seed"] = 7
    (out / MANIFEST).write_text(json.dumps(edited))
    assert "calibration_seed 7 -> 0" in one_line_error(run_eval(base))
    (out / MANIFEST).write_text(json.dumps(manifest))
    assert (out / PREDICTIONS).read_bytes() == before  # nothing was touched

    # adding a method is not a change: it joins the run
    r = run_eval(replace_option(base, "--methods", "large-ins,trimix-ppl,trimix-ppl-task,small-cpt"))
    assert r.returncode == 0, r.stderr.decode()
    assert "small-cpt" in json.loads((out / MANIFEST).read_text())["methods"]


@pytest.mark.slow
def test_raising_the_limit_extends_the_run_as_a_fresh_run_would(started, tmp_path):
    _, out, base = started
    first = (out / PREDICTIONS).read_bytes().splitlines()
    assert len(first) == 3
    r = run_eval([*base, "--limit", "3"])
    assert r.returncode == 0, r.stderr.decode()
    after = (out / PREDICTIONS).read_bytes().splitlines()
    assert after[:3] == first and len(after) == 9
    fresh = tmp_path / "fresh"
    r = run_eval([*replace_option(base, "--out", str(fresh)), "--limit", "3"])
    assert r.returncode == 0, r.stderr.decode()
    # per-task calibration samples the whole task, not the first items: the same pair either way
    name = "calibration-jsonl_task.json"
    assert json.loads((out / name).read_text()) == json.loads((fresh / name).read_text())
    resumed = json.loads((out / "results.json").read_text())["tasks"]
    assert json.loads((fresh / "results.json").read_text())["tasks"] == resumed


@pytest.mark.slow
def test_a_second_eval_on_the_folder_fails_at_once(tiny_trio, tmp_path):
    task = task_file(tmp_path / "task.jsonl", n=40)
    out = tmp_path / "run"
    args = [str(task), "--out", str(out), *models(tiny_trio), "-n", "16", "--n-ctx", "256", "--shots", "0"]
    args += ["--methods", "large-ins,small-cpt,small-base"]
    first = subprocess.Popen(
        [sys.executable, "-m", CLI, "eval", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / PREDICTIONS).exists():
            time.sleep(0.05)
        assert (out / LOCK).read_text().strip() == str(first.pid)
        # the first run is paused while the second starts, so that on a busy machine it cannot
        # finish (and release the folder) before the second one looks
        os.kill(first.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            err = one_line_error(run_eval(args))
        finally:
            os.kill(first.pid, signal.SIGCONT)
        assert f"the run folder {out} is in use by another trimix eval (pid {first.pid})" in err
        assert time.monotonic() - t0 < 30  # at once: no model loaded, no item computed
        assert first.wait(timeout=300) == 0
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    keys = [(x["task"], x["id"], x["method"]) for x in map(json.loads, (out / PREDICTIONS).read_bytes().splitlines())]
    assert len(keys) == len(set(keys)) == 120  # no duplicates
    # the lock held by this process is refused the same way
    with RunDir(out):
        assert "is in use by another trimix eval" in one_line_error(run_eval(args))


@pytest.mark.slow
def test_out_problems_and_foreign_lines_are_one_line(tiny_trio, tmp_path):
    task = task_file(tmp_path / "task.jsonl", n=2)
    common = [str(task), *models(tiny_trio), "-n", "4", "--n-ctx", "256", "--methods", "large-ins"]
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    assert "is a file, not a folder" in one_line_error(run_eval([*common, "--out", str(a_file)]))
    assert "cannot create the run folder" in one_line_error(run_eval([*common, "--out", str(a_file / "run")]))
    assert "is not writable" in one_line_error(run_eval([*common, "--out", "/proc/self"]))
    out = tmp_path / "run"
    assert run_eval([*common, "--out", str(out)]).returncode == 0
    preds = out / PREDICTIONS
    good = preds.read_text(encoding="utf-8")
    preds.write_text('{"hello": "world"}\n' + good, encoding="utf-8")
    assert "line 1 is not a prediction record" in one_line_error(run_eval([*common, "--out", str(out)]))
    preds.write_text(good.replace("\n", "\nnot json\n", 1), encoding="utf-8")
    assert "line 2 is not valid JSON and is not the last line" in one_line_error(run_eval([*common, "--out", str(out)]))


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--limit", "0"], "--limit must be a whole number of items, 1 or more, got 0"),
        (["--limit", "-1"], "--limit must be a whole number of items, 1 or more, got -1"),
        (["-n", "-5"], "--max-tokens must be a whole number, 1 or more, got -5"),
        (["-n", "0"], "--max-tokens must be a whole number, 1 or more, got 0"),
        (["--calibration-n", "0"], "--calibration-n must be a whole number, 1 or more, got 0"),
        (["--shots", "-1"], "--shots must be a whole number, 0 or more, got -1"),
        (["--mc-mode", "vote"], "--mc-mode is generate or score"),
        (["--rouge-tokenizer", "nltk"], "--rouge-tokenizer is xlsum or script"),
    ],
)
def test_out_of_range_numbers_are_one_line(tiny_trio, tmp_path, extra, needle):
    task = task_file(tmp_path / "task.jsonl", n=2)
    out = tmp_path / "run"
    err = one_line_error(run_eval([str(task), *models(tiny_trio), "--out", str(out), *extra]))
    assert needle in err
    assert not out.exists()  # refused before anything was made


def test_numbers_are_checked_by_the_library(tiny_trio, tmp_path):
    with pytest.raises(SettingsError, match=r"^max_tokens"):
        GenerationSettings(max_tokens=-5)
    with pytest.raises(SettingsError, match=r"^mc_mode"):
        GenerationSettings(mc_mode="vote")
    with tm.Engine({"large_ins": tiny_trio["large_ins"]}, tm.LoadOptions(n_ctx=128, n_gpu_layers=0)) as eng:
        with pytest.raises(SettingsError, match=r"^calibration_n must be a whole number, 1 or more, got 0"):
            Runner(eng, tmp_path, calibration_n=0)


@pytest.mark.slow
def test_calibrate_output_is_checked_before_models_load(tiny_trio, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "the cat"}\n')
    flags = [f"--{r.replace('_', '-')}={tiny_trio[r]}" for r in ("large_ins", "small_cpt", "small_base")]
    target = tmp_path / "missing" / "dir" / "w.json"
    r = trimix("calibrate", "--prompts", str(prompts), "-o", str(target), *flags)
    err = one_line_error(r)
    assert "does not exist" in err and "missing" in err
    err = one_line_error(trimix("calibrate", "--prompts", str(prompts), "-o", str(tmp_path), *flags))
    assert "is a folder" in err


def test_likelihood_scoring_past_eight_options(tiny_trio, tmp_path):
    options = tuple(f"word {w}" for w in ("the", "cat", "dog", "ཀ", "man", "a", "is", "of", "sat", "ran"))
    item = Item("q", "the cat and the", "J", options, "choice", "accuracy", 0)
    opts = tm.LoadOptions(n_ctx=128, n_gpu_layers=0)
    with tm.Engine({"large_ins": tiny_trio["large_ins"]}, opts) as eng:
        from trimix_cpp.evaluation.predict import parse_methods

        [method] = parse_methods("large-ins")
        runner = Runner(eng, tmp_path, GenerationSettings(mc_mode="score"))
        try:
            [rec] = runner.predict_item(Task("t", [item]), item, [method])
        finally:
            runner.close()
        nll = [eng.continuation_nll(item.prompt, " " + o, tm.plan("single")) for o in options]
    assert rec["output"] == "ABCDEFGHIJ"[nll.index(min(nll))]


@pytest.mark.slow
def test_an_item_too_long_for_the_context_does_not_stop_the_run(tiny_trio, tmp_path):
    task = tmp_path / "task.jsonl"
    records = [
        {"id": "short", "input": "the cat:", "gold": "dog"},
        {"id": "long", "input": "the cat " * 400, "gold": "x"},
    ]
    records.append({"id": "after", "input": "a dog:", "gold": "cat"})
    task.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "run"
    r = run_eval(
        [str(task), *models(tiny_trio), "--out", str(out), "-n", "4", "--n-ctx", "256", "--methods", "large-ins"]
    )
    err = r.stderr.decode()
    assert r.returncode == 0, err
    recs = {x["id"]: x for x in map(json.loads, (out / PREDICTIONS).read_bytes().splitlines())}
    assert set(recs) == {"short", "long", "after"}
    assert recs["long"]["output"] == "" and "context holds 256" in recs["long"]["error"]
    notes = json.loads((out / "results.json").read_text())["tasks"]["jsonl:task"]["notes"]
    assert any("1 predictions did not fit the context" in n for n in notes)
    assert "1 predictions did not fit the context" in err


@pytest.mark.skipif(not (SHARED / "milic-eval").is_dir(), reason="no shared MiLiC-Eval files")
def test_shared_classification_runs_with_passages_cut(tiny_trio, tmp_path):
    # With a 512-token context the articles (byte tokens: about two per Uyghur letter) cannot fit even
    # alone; before, the first of them stopped the whole run.
    out = tmp_path / "run"
    spec = f"milic:{SHARED / 'milic-eval'}:text_classification:ug"
    args = [spec, *models(tiny_trio), "--out", str(out), "-n", "2", "--n-ctx", "512", "--limit", "2"]
    r = run_eval([*args, "--methods", "large-ins"])
    err = r.stderr.decode()
    assert r.returncode == 0, err
    notes = json.loads((out / "results.json").read_text())["tasks"]["text_classification:ug"]["notes"]
    assert any("2 of 2 passages cut to" in n for n in notes), notes
    assert "2 of 2 passages cut to" in err
    assert "error" not in (out / PREDICTIONS).read_text(encoding="utf-8")
