"""trimix eval end to end on tiny models: MiLiC-Eval layout, resume after a kill, the oracle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from commands import models, run_eval
from reference import log_softmax

import trimix_cpp as tm
from trimix_cpp._llama import LlamaModel
from trimix_cpp.evaluation.predict import PredictionLog

TRIO = ("large_ins", "small_cpt", "small_base")
GRID = ["--grid-alpha", "0.1,1", "--grid-beta", "0.1,1"]


def milic(root: Path) -> Path:
    """A MiLiC-Eval folder with a Uyghur-English translation task and a multiple-choice task."""
    tr = root / "translation" / "ug"
    tr.mkdir(parents=True)
    pairs = [
        ("ئالما", "apple"),
        ("كىتاب", "book"),
        ("سۇ", "water"),
        ("ئۆي", "house"),
        ("تاغ", "mountain"),
        ("دەريا", "river"),
    ]
    recs = [{"id": f"p{i}", "ug": u, "en": e} for i, (u, e) in enumerate(pairs)]
    (tr / "train_1.json").write_text(json.dumps(recs[:3], ensure_ascii=False), encoding="utf-8")
    test = [*recs[3:], {"id": "bad", "ug": 7}]  # a malformed record: reported, the rest goes on
    (tr / "test.json").write_text(json.dumps(test, ensure_ascii=False), encoding="utf-8")
    rc = root / "reading_comprehension" / "ug"
    rc.mkdir(parents=True)
    q = [
        {
            "id": f"q{i}",
            "context": ["the cat sat"],
            "question": "who sat?",
            "options": ["the cat", "a dog"],
            "answer": "A",
        }
        for i in range(4)
    ]
    (rc / "train_1.json").write_text(json.dumps(q[:2]), encoding="utf-8")
    (rc / "test.json").write_text(json.dumps(q[2:]), encoding="utf-8")
    return root


@pytest.mark.slow
def test_milic_layout_all_methods(tiny_trio, tmp_path):
    root = milic(tmp_path / "data")
    out = tmp_path / "run"
    args = [
        "--plot",
        str(tmp_path / "plot.png"),
        f"milic:{root}:translation:ug",
        f"milic:{root}:reading_comprehension:ug",
        *models(tiny_trio),
        "--out",
        str(out),
        "-n",
        "6",
        "--n-ctx",
        "512",
        "--calibration-n",
        "2",
        "--shots",
        "2",
        *GRID,
    ]
    r = run_eval(args)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "test.json record [3]: field" in err  # the malformed record is named: file, record, field
    res = json.loads((out / "results.json").read_text())
    tasks = res["tasks"]
    assert set(tasks) == {"translation:ug-en", "reading_comprehension:ug"}
    assert (
        tasks["translation:ug-en"]["metric"] == "chrf++" and tasks["reading_comprehension:ug"]["metric"] == "accuracy"
    )
    for t in tasks.values():
        assert not [k for k in t["scores"] if k.startswith("trimix@")]  # only the requested methods are columns
        # the pairs trimix-ppl-task and trimix-ent-task fixed are grid pairs the oracle maximises over
        assert t["scores"]["upper-bound"] >= max(t["scores"]["trimix-ppl-task"], t["scores"]["trimix-ent-task"]) - 1e-9
    # the oracle is the best grid pair by the metric, computed from the logged predictions
    log = PredictionLog(out / "predictions.jsonl")
    pairs = {k[2] for k in log.records if k[2].startswith("trimix@")}
    assert pairs == {"trimix@0.1:0.1", "trimix@0.1:1", "trimix@1:0.1", "trimix@1:1"}
    cal = json.loads((out / "calibration-translation_ug-en.json").read_text())
    assert len(cal["scores"]) == 2 and cal["n_prompts"] == 2
    ent = json.loads((out / "calibration-translation_ug-en-ent.json").read_text())
    assert ent["strategy"] == "ent" and len(ent["scores"]) == 2
    assert "| upper-bound (oracle) |" in (out / "results.md").read_text()
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log.close()


@pytest.mark.slow
def test_resume_after_kill_neither_redoes_nor_loses(tiny_trio, tmp_path):
    task = tmp_path / "task.jsonl"
    lines = [json.dumps({"id": f"t{i}", "input": f"the cat {i}:", "gold": "the dog"}) for i in range(12)]
    task.write_text("\n".join(lines) + "\n", encoding="utf-8")
    common = [*models(tiny_trio), "-n", "12", "--n-ctx", "256", "--methods", "large-ins,small-cpt,trimix@0.3:0.6"]
    out = tmp_path / "run"
    args = [str(task), "--out", str(out), *common]
    cmd = [sys.executable, "-m", "trimix_cli.main", "eval", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    preds = out / "predictions.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not preds.exists() or preds.read_text().count("\n") < 8):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = preds.read_bytes().splitlines()
    assert 8 <= len(before) < 36
    with preds.open("ab") as f:  # a crash in the middle of writing a line
        f.write(b'{"task": "jsonl:task", "id": "t2')
    r = run_eval(args)
    assert r.returncode == 0, r.stderr.decode()
    after = preds.read_bytes().splitlines()
    assert after[: len(before)] == before  # finished items kept as they were, not redone
    keys = [(x["task"], x["id"], x["method"]) for x in map(json.loads, after)]
    assert len(keys) == len(set(keys)) == 36  # every item of every method exactly once
    fresh = tmp_path / "fresh"
    assert run_eval([str(task), "--out", str(fresh), *common]).returncode == 0
    resumed = json.loads((out / "results.json").read_text())["tasks"]
    assert json.loads((fresh / "results.json").read_text())["tasks"] == resumed


def test_multiple_choice_by_likelihood_matches_reference(tiny_trio):
    prompt, options = "the cat and the", [" dog", " ཀག", " man"]
    with tm.Engine({"large_ins": tiny_trio["large_ins"]}, tm.LoadOptions(n_ctx=128, n_gpu_layers=0)) as eng:
        got = [eng.continuation_nll(prompt, o, tm.plan("single")) for o in options]
        head = eng.tokenize(prompt)
    with LlamaModel(tiny_trio["large_ins"], n_ctx=128, n_gpu_layers=0) as m:
        for o, value in zip(options, got):
            tail = m.tokenize(o, add_bos=False)
            seq = np.concatenate([head, tail]).astype(np.int32)
            m.clear()
            m.decode(seq, np.ones(len(seq), np.int8))
            rows = m.logits_rows(len(seq)).astype(np.float64)
            ref = np.mean([-log_softmax(rows[len(head) - 1 + k])[tail[k]] for k in range(len(tail))])
            assert value == pytest.approx(ref, abs=1e-4)


@pytest.mark.slow
def test_unknown_task_and_method_are_one_line(tiny_trio, tmp_path):
    r = run_eval(["nonsense.txt", *models(tiny_trio)])
    assert r.returncode == 1 and "unknown task" in r.stderr.decode()
    r = run_eval([str(tmp_path / "x.jsonl"), *models(tiny_trio), "--methods", "bogus"])
    assert r.returncode == 1 and "unknown method 'bogus'" in r.stderr.decode()
