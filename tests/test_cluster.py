"""trimix eval --ray on a local Ray instance (127.0.0.1, two CPUs, no dashboard): the same predictions
and scores as a local run on the demo trio over a real MiLiC-Eval task, a worker killed in the middle,
a worker with another model file, Ctrl-C and resume; and the whole-file SHA-256 the workers check."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from commands import trimix

from trimix_cpp.evaluation.cluster import worker_name
from trimix_cpp.evaluation.folder import MANIFEST, PREDICTIONS, RunDir, file_sha256, model_identity

SHARED = Path(os.environ.get("TRIMIX_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_data = pytest.mark.skipif(
    not (SHARED / "milic-eval").is_dir(), reason=f"no shared MiLiC-Eval files at {SHARED} (set TRIMIX_SHARED_DATA)"
)
GRID = ["--grid-alpha", "0.1,1", "--grid-beta", "0.1,1"]
ITEMS = 4


def eval_args(out: Path, limit: int) -> list[str]:
    """A small real run: the demo trio on MiLiC-Eval's Uyghur dialogue translation, read in place."""
    task = f"milic:{SHARED / 'milic-eval'}:translation_dialogue:ug"
    methods = "large-ins,proxy,trimix-ppl-task"  # a per-task calibration too: a worker computes it
    common = ["--lang", "demo", "--shots", "1", "-n", "6", "--calibration-n", "2", "--threads", "1", *GRID]
    return [task, "--out", str(out), "--limit", str(limit), "--methods", methods, *common]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / PREDICTIONS).read_text(encoding="utf-8").splitlines() if line]


def by_key(recs: list[dict]) -> dict[tuple[str, str, str], dict]:
    """Records by (task, id, method), without the time each took (the one field that may differ)."""
    keys = [(r["task"], r["id"], r["method"]) for r in recs]
    assert len(keys) == len(set(keys)), "a prediction is in the file twice"
    return {k: {f: v for f, v in r.items() if f != "seconds"} for k, r in zip(keys, recs)}


def scores(out: Path) -> dict:
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


# --- the whole-file hash and the manifest (no Ray needed) -----------------------------------------


def test_file_sha256_is_the_whole_file_hash_cached_by_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("TRIMIX_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"a" * 5_000_000)
    assert file_sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    assert json.loads((tmp_path / "cache" / "sha256.json").read_text())[str(f.resolve())]["sha256"] == file_sha256(f)
    # Same size and mtime: the cached digest is trusted (the file is not read again) ...
    st = f.stat()
    f.write_bytes(b"b" * 5_000_000)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_sha256(f) == hashlib.sha256(b"a" * 5_000_000).hexdigest()
    # ... and a new mtime reads it again.
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert file_sha256(f) == hashlib.sha256(b"b" * 5_000_000).hexdigest()
    assert model_identity(f)["file_sha256"] == hashlib.sha256(b"b" * 5_000_000).hexdigest()


def test_a_folder_made_before_the_whole_file_hash_resumes_and_gains_it(tmp_path, tiny_trio):
    ident = model_identity(tiny_trio["large_ins"])
    old = {k: v for k, v in ident.items() if k != "file_sha256"}
    out = tmp_path / "run"
    out.mkdir()
    manifest = {"format": "trimix-run/2", "settings": {"shots": 1}, "models": {"large_ins": old}, "methods": {}}
    manifest["tasks"] = {}
    (out / MANIFEST).write_text(json.dumps(manifest))
    (out / PREDICTIONS).write_text(json.dumps({"task": "t", "id": "1", "method": "m", "output": "x"}) + "\n")
    with RunDir(out) as run:
        run.check(settings={"shots": 1}, models={"large_ins": ident})
        run.save()
    assert json.loads((out / MANIFEST).read_text())["models"]["large_ins"]["file_sha256"] == ident["file_sha256"]
    other = dict(ident, sha256="0" * 16)
    with RunDir(out) as run, pytest.raises(Exception, match="model large_ins"):
        run.check(settings={"shots": 1}, models={"large_ins": other})


@pytest.mark.slow
def test_workers_without_ray_is_an_error(tmp_path, tiny_trio):
    r = trimix("eval", str(tmp_path / "t.jsonl"), "--workers", "2", "--large-ins", str(tiny_trio["large_ins"]))
    err = r.stderr.decode()
    assert r.returncode == 1 and "--workers counts Ray workers: add --ray" in err, err
    assert len(err.strip().splitlines()) == 1


# --- on a local Ray instance ----------------------------------------------------------------------

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on 127.0.0.1 only (read on import)
try:
    import ray
except ImportError:  # the [ray] extra is not installed
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed (pip install -e '.[ray]')")


@pytest.fixture(scope="module")
def cluster():
    """A Ray instance for this module, on 127.0.0.1 with two CPUs; the runs join it by address."""
    ctx = ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 << 20,
        namespace="trimix",
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    try:
        yield ctx.address_info["address"]
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The reference: the same evaluation without Ray."""
    out = tmp_path_factory.mktemp("local") / "run"
    r = trimix("eval", *eval_args(out, ITEMS))
    assert r.returncode == 0, r.stderr.decode()
    return out


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "trimix_cli.main", "eval", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def wait_for_lines(out: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        path = out / PREDICTIONS
        have = len(path.read_bytes().splitlines()) if path.exists() else 0
        if have >= n:
            return have
        assert proc.poll() is None, proc.communicate()[1].decode()
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} predictions after {timeout} s")


@pytest.mark.slow
@needs_ray
def test_an_address_where_nothing_answers_is_one_line(tmp_path, tiny_trio):
    task = tmp_path / "t.jsonl"
    task.write_text(json.dumps({"id": "1", "input": "the cat", "gold": "x"}) + "\n")
    args = ["--large-ins", str(tiny_trio["large_ins"]), "--methods", "large-ins", "--out", str(tmp_path / "run")]
    r = trimix("eval", str(task), *args, "--ray", "127.0.0.1:1", "--workers", "1")
    err = r.stderr.decode()
    assert r.returncode == 1 and "nothing answers at --ray 127.0.0.1:1" in err, err
    assert len(err.strip().splitlines()) == 1


@needs_ray
@needs_data
def test_two_workers_give_the_local_predictions_and_scores(cluster, local_run, tmp_path):
    out = tmp_path / "run"
    r = trimix("eval", *eval_args(out, ITEMS), "--ray", cluster, "--workers", "2")
    assert r.returncode == 0, r.stderr.decode()
    local = by_key(records(local_run))
    assert len(local) == ITEMS * 3
    assert by_key(records(out)) == local
    assert scores(out) == scores(local_run)
    # the per-task calibration was computed by a worker and written by the driver, as a local run writes it
    [cal] = out.glob("calibration-*.json")
    assert (
        json.loads(cal.read_text())["chosen"]
        == json.loads(next(local_run.glob("calibration-*.json")).read_text())["chosen"]
    )


@needs_ray
@needs_data
@pytest.mark.parametrize("how", ["node lost", "process killed"])
def test_a_worker_killed_in_the_middle_loses_and_duplicates_nothing(cluster, local_run, tmp_path, how):
    out = tmp_path / "run"
    proc = start([*eval_args(out, ITEMS), "--ray", cluster, "--workers", "2"])
    try:
        seen = wait_for_lines(out, 1, proc)
        actor = ray.get_actor(worker_name(0, proc.pid), namespace="trimix")
        if how == "node lost":
            ray.kill(actor, no_restart=True)  # gone for good: the other worker takes its items
        else:
            pid = ray.get(actor.pid.options(concurrency_group="probe").remote(), timeout=60)
            os.kill(pid, signal.SIGKILL)  # a crash: Ray restarts the worker, which checks and loads again
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = err.decode()
    assert proc.returncode == 0, err
    assert seen < ITEMS * 3, "the run had finished before the kill"
    assert "worker 0 on " in err and "died holding" in err, err
    assert ("the run goes on without it" if how == "node lost" else "Ray restarted it") in err, err
    assert by_key(records(out)) == by_key(records(local_run))  # every item exactly once, the same answers
    assert scores(out) == scores(local_run)


@needs_ray
@needs_data
def test_ctrl_c_stops_the_workers_keeps_what_finished_and_resumes(cluster, local_run, tmp_path):
    out = tmp_path / "run"
    args = [*eval_args(out, ITEMS), "--ray", cluster, "--workers", "2"]
    proc = start(args)
    try:
        wait_for_lines(out, 1, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err.decode()
    assert "interrupted" in err.decode()
    kept = by_key(records(out))
    assert 0 < len(kept) < ITEMS * 3
    reference = by_key(records(local_run))
    assert all(reference[k] == v for k, v in kept.items())
    for k in range(2):  # the workers are gone with the driver's Ctrl-C
        with pytest.raises(ValueError):
            ray.get_actor(worker_name(k, proc.pid), namespace="trimix")
    r = trimix("eval", *args)
    assert r.returncode == 0, r.stderr.decode()
    assert by_key(records(out)) == reference
    assert scores(out) == scores(local_run)


@pytest.mark.slow
@needs_ray
def test_a_worker_with_another_model_file_refuses(cluster, tiny_trio, tmp_path):
    """The driver's manifest names one small-cpt file; the worker's file at that path is another."""
    from trimix_cpp.evaluation.cluster import ClusterError, ClusterOptions, RayBackend
    from trimix_cpp.evaluation.pipeline import BackendSpec, RunnerSettings
    from trimix_cpp.evaluation.predict import GenerationSettings
    from trimix_cpp.loading import LoadOptions

    paths = {r: tiny_trio[r] for r in ("large_ins", "small_cpt", "small_base")}
    manifest = {r: model_identity(p) for r, p in paths.items()}
    manifest["small_cpt"] = model_identity(tiny_trio["large_base"])  # what the run was made with
    settings = RunnerSettings(GenerationSettings(max_tokens=4), (0.1, 1.0), (0.1, 1.0), 2, 0, 0)
    with pytest.raises(ClusterError) as info:
        RayBackend(
            BackendSpec(paths, LoadOptions(n_ctx=256, n_gpu_layers=0), manifest, settings),
            ClusterOptions(cluster, 1, 1),
        )
    msg = str(info.value)
    assert "\n" not in msg
    assert "refuses" in msg and "127.0.0.1" in msg and str(Path(paths["small_cpt"]).resolve()) in msg, msg
    assert manifest["small_cpt"]["file_sha256"][:16] in msg
