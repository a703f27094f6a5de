"""The run folder on its own: manifest comparison, the lock, the predictions file, --out problems."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trimix_cpp.calibrate import check_output_path, read_calibration
from trimix_cpp.errors import TrimixError, flag
from trimix_cpp.evaluation.folder import (
    LOCK,
    MANIFEST,
    PREDICTIONS,
    RunDir,
    RunDirError,
    file_identity,
    model_identity,
    read_predictions,
)

SETTINGS = {"shots": 5, "max_tokens": 64, "mc_mode": "generate", "stop": ["\n"], "n_ctx": 1024}
METHODS = {"trimix-ppl": {"select": "ppl", "grid_alpha": [0.1, 1.0], "grid_beta": [0.1, 1.0]}}


def record(task: str = "t", item: str = "1", method: str = "large-ins", output: str = "x") -> str:
    return json.dumps({"task": task, "id": item, "method": method, "output": output})


def start(out: Path, settings=SETTINGS, methods=METHODS, models=None, tasks=None) -> None:
    """One run that made a prediction: the manifest is saved and the folder has work in it."""
    with RunDir(out) as run:
        run.check(settings=settings, methods=methods, models=models or {"large_ins": {"file": "a"}})
        run.check(tasks=tasks or {"t": {"files": [{"file": "t.jsonl", "bytes": 3, "sha256": "ab"}]}})
        run.save()
        (out / PREDICTIONS).write_text(record() + "\n", encoding="utf-8")


def test_same_settings_resume_and_new_entries_join(tmp_path: Path) -> None:
    out = tmp_path / "run"
    start(out)
    with RunDir(out) as run:
        run.check(settings=SETTINGS, methods={**METHODS, "proxy": {"fusion": "proxy"}})
        run.check(models={"large_ins": {"file": "a"}, "small_cpt": {"file": "c"}})
        run.check(tasks={"u": {"files": []}})  # another task joins
        run.save()
    saved = json.loads((out / MANIFEST).read_text())
    assert set(saved["methods"]) == {"trimix-ppl", "proxy"} and set(saved["tasks"]) == {"t", "u"}
    assert set(saved["models"]) == {"large_ins", "small_cpt"}


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"settings": {**SETTINGS, "shots": 3}}, "shots 5 -> 3"),
        ({"settings": {**SETTINGS, "stop": ["\n", "."]}}, 'stop ["\\n"] -> ["\\n", "."]'),
        ({"settings": {**SETTINGS, "n_ctx": 2048}}, "n_ctx 1024 -> 2048"),
        (
            {"methods": {"trimix-ppl": {"select": "ppl", "grid_alpha": [0.5], "grid_beta": [0.1, 1.0]}}},
            "method trimix-ppl: grid_alpha 0.1,1 -> 0.5",
        ),
        ({"models": {"large_ins": {"file": "b"}}}, 'model large_ins {"file": "a"} -> {"file": "b"}'),
        (
            {"tasks": {"t": {"files": [{"file": "t.jsonl", "bytes": 4, "sha256": "cd"}]}}},
            "task t t.jsonl (3 bytes, sha256 ab) -> t.jsonl (4 bytes, sha256 cd)",
        ),
    ],
)
def test_a_change_is_one_line_naming_old_and_new(tmp_path: Path, change: dict, needle: str) -> None:
    out = tmp_path / "run"
    start(out)
    parts = {"settings": SETTINGS, "methods": METHODS, "models": {"large_ins": {"file": "a"}}, **change}
    with RunDir(out) as run, pytest.raises(RunDirError) as info:
        run.check(**parts)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg
    assert f"Use another out for a new run, or delete {out} to start over" in msg
    assert f"Use another --out for a new run, or delete {out} to start over" in info.value.render(flag)


def test_a_folder_without_work_takes_the_new_manifest(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with RunDir(out) as run:
        run.check(settings=SETTINGS)
        run.save()  # saved, but the run stopped before its first prediction
    with RunDir(out) as run:
        run.check(settings={**SETTINGS, "shots": 1})
        run.save()
    assert json.loads((out / MANIFEST).read_text())["settings"]["shots"] == 1


def test_predictions_without_a_manifest_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / PREDICTIONS).write_text(record() + "\n", encoding="utf-8")
    with pytest.raises(RunDirError, match=r"holds predictions but no run\.json"):
        RunDir(out).open()
    (out / MANIFEST).write_text("{not json", encoding="utf-8")
    with pytest.raises(RunDirError, match="is not a trimix run manifest"):
        RunDir(out).open()
    (out / MANIFEST).write_text('{"format": "trimix-run/1"}', encoding="utf-8")
    with pytest.raises(RunDirError, match=r"made by another version of trimix eval \(format trimix-run/1, this one"):
        RunDir(out).open()


def test_a_calibration_file_of_another_format_is_one_line(tmp_path: Path) -> None:
    old = tmp_path / "calibration-t.json"
    old.write_text(json.dumps({"alpha": 0.1, "beta": 1.0, "mean_nll": [[1.0]]}), encoding="utf-8")
    with pytest.raises(TrimixError, match=r"is not a calibration file of format trimix-weights/1") as info:
        read_calibration(old)
    assert "\n" not in str(info.value)


def test_identities(tmp_path: Path) -> None:
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"GGUF" + bytes(10 << 20))
    b.write_bytes(b"GGUF" + bytes((10 << 20) - 1) + b"\x01")  # same size and header, another last byte
    ia, ib = model_identity(a), model_identity(b)
    assert ia["file"] == "a.gguf" and ia["bytes"] == ib["bytes"] and ia["sha256"] != ib["sha256"]
    assert model_identity(a) == ia
    t = tmp_path / "t.jsonl"
    t.write_text("x\n")
    assert file_identity(t) == {"file": "t.jsonl", "bytes": 2, "sha256": hashlib.sha256(b"x\n").hexdigest()[:16]}
    with pytest.raises(RunDirError, match="cannot read model file"):
        model_identity(tmp_path / "missing.gguf")


# --- the lock ------------------------------------------------------------------------------------


def test_a_second_holder_fails_at_once_naming_the_folder_and_pid(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with RunDir(out):
        assert (out / LOCK).read_text().strip() == str(os.getpid())
        with pytest.raises(RunDirError) as info:
            RunDir(out).open()
        assert f"the run folder {out} is in use by another trimix eval (pid {os.getpid()})" in str(info.value)
        # from another process too
        code = "import sys; from trimix_cpp.evaluation.folder import RunDir; RunDir(sys.argv[1]).open()"
        r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, timeout=60)
        assert r.returncode != 0 and b"is in use by another trimix eval" in r.stderr
    RunDir(out).open().close()  # released on exit


# --- the predictions file ------------------------------------------------------------------------


def test_a_record_cut_short_at_the_end_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / PREDICTIONS
    good = record(item="1") + "\n" + record(item="2") + "\n"
    path.write_text(good + '{"task": "t", "id": "3', encoding="utf-8")
    assert set(read_predictions(path)) == {("t", "1", "large-ins"), ("t", "2", "large-ins")}
    assert path.read_text(encoding="utf-8") == good
    # a whole record whose newline never came is dropped as well: its write may not have finished
    path.write_text(good + record(item="3"), encoding="utf-8")
    assert len(read_predictions(path)) == 2 and path.read_text(encoding="utf-8") == good
    # a last line that is broken although it ends in a newline (a crash, then a zero-filled tail)
    path.write_text(good + "\0\0\0\n", encoding="utf-8")
    assert len(read_predictions(path)) == 2 and path.read_text(encoding="utf-8") == good
    # blank lines are harmless
    path.write_text(record(item="1") + "\n\n" + record(item="2") + "\n", encoding="utf-8")
    assert len(read_predictions(path)) == 2


@pytest.mark.parametrize(
    "lines,needle",
    [
        ([record(), "{broken", record(item="2")], "line 2 is not valid JSON and is not the last line"),
        ([record(), '{"name": "something else"}'], "line 2 is not a prediction record"),
        (["[1, 2, 3]", record()], "line 1 is not a prediction record"),
        ([json.dumps({"task": "t", "id": 1, "method": "m", "output": "x"})], "line 1 is not a prediction record"),
    ],
)
def test_foreign_lines_are_one_line_errors(tmp_path: Path, lines: list[str], needle: str) -> None:
    path = tmp_path / PREDICTIONS
    before = "\n".join(lines) + "\n"
    path.write_text(before, encoding="utf-8")
    with pytest.raises(RunDirError) as info:
        read_predictions(path)
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert path.read_text(encoding="utf-8") == before  # nothing is dropped from a file that is not ours
    with pytest.raises(RunDirError, match=needle):
        RunDir(tmp_path).open()


# --- --out problems ------------------------------------------------------------------------------


def test_out_that_is_a_file(tmp_path: Path) -> None:
    out = tmp_path / "results.txt"
    out.write_text("x")
    with pytest.raises(RunDirError, match=r"^out .*results\.txt is a file, not a folder"):
        RunDir(out).open()
    with pytest.raises(RunDirError, match="cannot create the run folder"):
        RunDir(out / "sub").open()


def _read_only(folder: Path) -> bool:
    """Make a folder read-only; False where this user can write it anyway (root)."""
    folder.chmod(0o555)
    try:
        (folder / "probe").write_text("x")
    except OSError:
        return True
    (folder / "probe").unlink()
    folder.chmod(0o755)
    return False


def test_out_that_is_read_only(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    if not _read_only(ro):
        pytest.skip("this user can write to read-only folders")
    try:
        with pytest.raises(RunDirError, match=r"the run folder .*ro is not writable"):
            RunDir(ro).open()
        with pytest.raises(RunDirError, match="cannot create the run folder"):
            RunDir(ro / "run").open()
        with pytest.raises(TrimixError, match="is not writable"):
            check_output_path(ro / "w.json")
    finally:
        ro.chmod(0o755)


def test_out_on_a_read_only_file_system(tmp_path: Path) -> None:
    # /proc is read-only even for root: the same one-line errors, whoever runs the tests
    with pytest.raises(RunDirError, match="cannot create the run folder /proc/trimix-run"):
        RunDir("/proc/trimix-run").open()
    with pytest.raises(RunDirError, match="the run folder /proc/self is not writable"):
        RunDir("/proc/self").open()


# --- trimix calibrate -o -------------------------------------------------------------------------


def test_calibrate_output_is_checked(tmp_path: Path) -> None:
    check_output_path(tmp_path / "w.json")  # fine
    with pytest.raises(TrimixError, match=r"the folder .*missing.dir does not exist \(create it"):
        check_output_path(tmp_path / "missing" / "dir" / "w.json")
    with pytest.raises(TrimixError, match="is a folder; give a file path"):
        check_output_path(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(TrimixError, match="is not a folder"):
        check_output_path(tmp_path / "f" / "w.json")
    with pytest.raises(TrimixError, match="not writable"):
        check_output_path("/proc/w.json")
