"""A run folder of ``trimix eval``: what its predictions were made with, and who is writing them.

Predictions are keyed by (task, item id, method) only, so the folder itself must remember everything
else a prediction depends on, or a rerun with other models, another grid, other shots or another
task file of the same name would reuse stale predictions and calibrations as if they were new. The
manifest, ``run.json``, holds:

* ``settings``, compared in full: shots, max tokens (and the multiple-choice answer length), the
  multiple-choice mode, the stop strings, the context length (the prompt budget follows from it) and
  the prompt format's version;
* ``models``: each role's file name, size, a quick digest (head and tail) and the SHA-256 of the whole
  file (what a cluster worker checks its own copy against, and what ``sha256sum`` prints); the full
  hash is computed once per file and remembered by path, size and modification time, so a resume does
  not read gigabytes again;
* ``methods``: each method with the settings its predictions depend on (fixed weights; the grid of a
  per-prompt selection; the grid, sample size and seed of a per-task calibration);
* ``tasks``: each task's files, with their sizes and SHA-256 digests.

On resume every setting must be equal, and every model, method and task the folder already has must
be the same as before; new ones may join (a later run can add a method or a task, since its
predictions have keys of their own). ``--limit`` is not part of a run's identity: raising it
extends the run. A mismatch is one line naming what changed, old -> new.

The folder is locked for the whole run (``fcntl.flock`` on ``run.lock``, non-blocking), so a second
process on the same folder fails at once instead of computing every item again and writing
duplicates; the lock file holds the pid of the process that has it. The kernel drops the lock when
that process ends, however it ends.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import TrimixError
from ..fusion import FusionPlan
from ..packaged import cache_dir
from ..selection import Selector

# The version of what a run folder holds (this manifest, the predictions, the calibration files).
# /2: calibration files are weights files (trimix-weights/1) with a "scores" grid.
FORMAT = "trimix-run/2"
MANIFEST = "run.json"
LOCK = "run.lock"
PREDICTIONS = "predictions.jsonl"
SECTIONS = ("models", "methods", "tasks")  # sections whose entries may be added to on resume

# A model's digest covers its size, its first 8 MiB (the GGUF header: metadata, vocabulary, tensor
# table, and the first tensors) and its last 1 MiB (the last tensors), which tells apart a
# re-quantisation or a fine-tune of the same architecture without reading gigabytes.
_HEAD_BYTES = 8 << 20
_TAIL_BYTES = 1 << 20
_HASH_CHUNK = 4 << 20
_HASH_CACHE = "sha256.json"
_hash_lock = threading.Lock()


class RunDirError(TrimixError):
    """The run folder cannot be used: it is not a writable folder, another process holds it, its
    manifest does not match this run's settings, or its predictions file holds something else."""


# ---------------------------------------------------------------------------------------------------
# Identities.


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a whole file (64 hex digits), read once per file version.

    Hashing a 7B model reads gigabytes (seconds to a minute), so the digest is remembered in
    ``sha256.json`` of trimix's cache folder (``$TRIMIX_CACHE``) by resolved path, size and
    modification time (ns): a file rewritten in place changes its mtime and is read again. A cache
    that cannot be read or written only costs the re-read.
    """
    path = Path(path)
    try:
        real = path.resolve()
        st = real.stat()
    except OSError as e:
        raise RunDirError(f"cannot read model file {path}: {e.strerror or e}") from None
    key, stamp = str(real), [st.st_size, st.st_mtime_ns]
    cache = cache_dir() / _HASH_CACHE
    with _hash_lock:
        known = _read_hash_cache(cache)
        entry = known.get(key)
        if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
    digest = hashlib.sha256()
    try:
        with real.open("rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
    except OSError as e:
        raise RunDirError(f"cannot read model file {path}: {e.strerror or e}") from None
    value = digest.hexdigest()
    with _hash_lock:
        known = _read_hash_cache(cache)  # another process may have added entries meanwhile
        known[key] = {"stamp": stamp, "sha256": value}
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=".sha256.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(known, out)
            os.replace(tmp, cache)
        except OSError:
            pass  # no cache: the next run hashes again, nothing else changes
    return value


def _read_hash_cache(cache: Path) -> dict[str, Any]:
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def model_identity(path: str | Path) -> dict[str, Any]:
    """A model file's name, size in bytes, a digest of its size, head and tail (see above), and the
    SHA-256 of the whole file (:func:`file_sha256`)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        digest = hashlib.sha256(str(size).encode())
        with path.open("rb") as handle:
            digest.update(handle.read(_HEAD_BYTES))
            if size > _HEAD_BYTES:
                handle.seek(max(_HEAD_BYTES, size - _TAIL_BYTES))
                digest.update(handle.read(_TAIL_BYTES))
    except OSError as e:
        raise RunDirError(f"cannot read model file {path}: {e.strerror or e}") from None
    return {"file": path.name, "bytes": size, "sha256": digest.hexdigest()[:16], "file_sha256": file_sha256(path)}


def file_identity(path: str | Path) -> dict[str, Any]:
    """A task file's name, size and full SHA-256 (task files are small: they are read whole anyway)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RunDirError(f"cannot read task file {path}: {e.strerror or e}") from None
    return {"file": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()[:16]}


def task_identity(files: Sequence[str | Path]) -> dict[str, Any]:
    """What a task's predictions depend on besides the prompt settings: the files it is read from."""
    return {"files": [file_identity(f) for f in files]}


def method_identity(
    fusion: FusionPlan | Selector | None,
    task_level: str | None,
    *,
    grid_alpha: Sequence[float],
    grid_beta: Sequence[float],
    calibration_n: int,
    calibration_seed: int,
) -> dict[str, Any]:
    """The settings one method's predictions depend on.

    Fixed weights name themselves. A per-prompt selection depends on its grid; a per-task
    calibration on its grid, sample size and seed. The oracle (``upper-bound``) runs each grid pair as
    a ``trimix@A:B`` method whose name holds its weights, so a changed grid adds pairs and stales none.
    """
    if isinstance(fusion, FusionPlan):
        out: dict[str, Any] = {"fusion": fusion.method, "weights": dict(fusion.weights)}
        if fusion.plausibility_role:
            out["plausibility"] = [fusion.plausibility_role, fusion.plausibility_alpha]
        if fusion.params:
            out["params"] = dict(fusion.params)
        return out
    if isinstance(fusion, Selector):
        return {"select": fusion.strategy, "grid_alpha": list(fusion.alphas), "grid_beta": list(fusion.betas)}
    if task_level in ("ppl-task", "ent-task"):
        return {
            "calibrate": task_level.split("-")[0],
            "grid_alpha": list(grid_alpha),
            "grid_beta": list(grid_beta),
            "calibration_n": calibration_n,
            "calibration_seed": calibration_seed,
        }
    return {"oracle": task_level}


# ---------------------------------------------------------------------------------------------------
# The predictions file.


def is_prediction(record: object) -> bool:
    """Whether a parsed line is a prediction record (as the runner writes them)."""
    return isinstance(record, dict) and all(isinstance(record.get(k), str) for k in ("task", "id", "method", "output"))


def read_predictions(path: Path) -> dict[tuple[str, str, str], dict]:
    """The records of a predictions file by (task, id, method), after dropping a last record cut short.

    A crash in the middle of an append leaves a last line without its newline, or one that is not
    JSON: it is removed from the file (its item runs again), so the next record starts on a line of
    its own. Anything else that is not a prediction record (a broken line before the last one, valid
    JSON of another shape) means the file is not what the runner wrote: a one-line error, never a
    silent skip, since skipping would redo or lose work without saying so.
    """
    if not path.exists():
        return {}
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RunDirError(f"cannot read {path}: {e.strerror or e}") from None
    lines = data.split(b"\n")
    complete = data.endswith(b"\n") or not data
    last = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)
    records: dict[tuple[str, str, str], dict] = {}
    keep = len(data)
    offset = 0
    for i, raw in enumerate(lines):
        start, offset = offset, offset + len(raw) + 1
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if i == last:
                keep = start  # a write cut short by a crash: drop it
                break
            raise RunDirError(
                "{path} line {line} is not valid JSON and is not the last line, so it is not a write cut "
                "short by a crash: remove that line, or start a new run with another {out}",
                param="out",
                path=path,
                line=i + 1,
            ) from None
        if i == last and not complete:
            keep = start  # a whole record without its newline: the write may not have finished
            break
        if not is_prediction(rec):
            raise RunDirError(
                "{path} line {line} is not a prediction record (an object with string task, id, method and "
                "output): this file was not written by trimix eval; use another {out}",
                param="out",
                path=path,
                line=i + 1,
            )
        records[(rec["task"], rec["id"], rec["method"])] = rec
    if keep < len(data):
        try:
            with path.open("r+b") as handle:
                handle.truncate(keep)
        except OSError as e:
            raise RunDirError(f"cannot drop the unfinished last line of {path}: {e.strerror or e}") from None
    return records


# ---------------------------------------------------------------------------------------------------
# The folder.


def _show(value: object) -> str:
    if isinstance(value, dict) and {"file", "bytes", "sha256"} <= set(value):
        return f"{value['file']} ({value['bytes']} bytes, sha256 {value['sha256']})"
    if isinstance(value, dict) and "files" in value:
        return " + ".join(_show(f) for f in value["files"])
    if isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
        return ",".join(f"{v:g}" for v in value)
    return json.dumps(value, ensure_ascii=False)


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Changes between two manifests, as ``what: old -> new``; entries only in ``new`` are not changes."""
    changes = []
    old_settings, new_settings = old.get("settings", {}), new.get("settings", {})
    for key in sorted(set(old_settings) | set(new_settings)):
        if old_settings.get(key) != new_settings.get(key):
            changes.append(f"{key} {_show(old_settings.get(key))} -> {_show(new_settings.get(key))}")
    singular = {"models": "model", "methods": "method", "tasks": "task"}
    for section in SECTIONS:
        before = old.get(section, {})
        for name, after in new.get(section, {}).items():
            if name not in before or before[name] == after:
                continue
            if section == "models" and isinstance(before[name], dict) and isinstance(after, dict):
                # A folder made before a model field existed (the whole-file SHA-256) recorded less:
                # what both record must agree, and the new field joins on save.
                if all(before[name][k] == after[k] for k in before[name].keys() & after.keys()):
                    continue
            if section == "methods" and isinstance(before[name], dict) and isinstance(after, dict):
                a, b = before[name], after
                keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
                changes.append(
                    f"method {name}: " + ", ".join(f"{k} {_show(a.get(k))} -> {_show(b.get(k))}" for k in keys)
                )
            else:
                changes.append(f"{singular[section]} {name} {_show(before[name])} -> {_show(after)}")
    return changes


class RunDir:
    """A locked run folder and its manifest; use as a context manager around the whole run.

    ``open`` checks that the folder can be written, takes the lock and reads what the folder holds;
    ``check`` compares parts of this run's manifest with the folder's; ``save`` writes the merged
    manifest. A folder that holds no predictions and no calibrations yet has nothing to go stale,
    so its manifest is simply replaced.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._stored: dict[str, Any] | None = None
        self._manifest: dict[str, Any] = {"format": FORMAT, "settings": {}, **{s: {} for s in SECTIONS}}
        self._has_work = False

    # -- opening ----------------------------------------------------------------------------------

    def open(self) -> RunDir:
        self._prepare()
        self._lock()
        try:
            self._stored = self._read_manifest()
            self._has_work = bool(read_predictions(self.path / PREDICTIONS)) or any(
                self.path.glob("calibration-*.json")
            )
            if self._stored is None and self._has_work:
                raise RunDirError(
                    "{path} holds predictions but no {manifest}, so what they were made with is unknown: "
                    "delete {path} to start over, or use another {out}",
                    param="out",
                    path=self.path,
                    manifest=MANIFEST,
                )
        except BaseException:
            self.close()
            raise
        return self

    def _prepare(self) -> None:
        path = self.path
        if path.exists() and not path.is_dir():
            raise RunDirError(
                "{out} {path} is a file, not a folder: give the path of a folder (it is created)",
                param="out",
                path=path,
            )
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(
                "cannot create the run folder {path}: {why}; choose another {out}",
                param="out",
                path=path,
                why=e.strerror or e,
            ) from None
        try:
            with tempfile.TemporaryFile(dir=path):
                pass
            for name in (PREDICTIONS, MANIFEST):
                if (path / name).exists():
                    with (path / name).open("ab"):
                        pass
        except OSError as e:
            raise RunDirError(
                "the run folder {path} is not writable ({why}); choose another {out}",
                param="out",
                path=path,
                why=e.strerror or e,
            ) from None

    def _lock(self) -> None:
        lock = self.path / LOCK
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(
                "the run folder {path} is not writable ({why}); choose another {out}",
                param="out",
                path=self.path,
                why=e.strerror or e,
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = ""
            try:
                pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                holder = f" (pid {pid})" if pid.isdigit() else ""
            except OSError:
                pass
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirError(
                    "the run folder {path} is in use by another trimix eval{holder}: wait for it to finish, "
                    "or use another {out}",
                    param="out",
                    path=self.path,
                    holder=holder,
                ) from None
            raise RunDirError(f"cannot lock the run folder {self.path}: {e.strerror or e}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def _read_manifest(self) -> dict[str, Any] | None:
        path = self.path / MANIFEST
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            data = None
        if not isinstance(data, dict) or not str(data.get("format", "")).startswith("trimix-run/"):
            raise RunDirError(
                "{path} is not a trimix run manifest: delete {folder} to start over, or use another {out}",
                param="out",
                path=path,
                folder=self.path,
            )
        if data["format"] != FORMAT:
            raise RunDirError(
                "the run folder {path} was made by another version of trimix eval (format {found}, "
                "this one reads {format}): delete {path} to start over, or use another {out}",
                param="out",
                path=self.path,
                found=data["format"],
                format=FORMAT,
            )
        return data

    def close(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunDir:
        return self.open() if self._fd is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the manifest -----------------------------------------------------------------------------

    def check(
        self,
        *,
        settings: Mapping[str, Any] | None = None,
        models: Mapping[str, Any] | None = None,
        methods: Mapping[str, Any] | None = None,
        tasks: Mapping[str, Any] | None = None,
    ) -> None:
        """Add parts of this run's manifest and compare them with the folder's; a one-line error on
        any change. Values must be JSON data (they are compared after a JSON round trip)."""
        given = {"settings": settings, "models": models, "methods": methods, "tasks": tasks}
        for section, value in given.items():
            if value is not None:
                self._manifest[section].update(json.loads(json.dumps(value)))
        if self._stored is None or not self._has_work:
            return
        changes = _differences(self._stored, {k: v for k, v in self._manifest.items() if k != "format"})
        if changes:
            raise RunDirError(
                "the run folder {path} was made with other settings: {changes}. Use another "
                "{out} for a new run, or delete {path} to start over",
                param="out",
                path=self.path,
                changes="; ".join(changes),
            )

    def save(self) -> None:
        """Write the manifest: the folder's entries, joined by this run's new ones."""
        merged = dict(self._manifest)
        if self._stored is not None and self._has_work:
            for section in SECTIONS:
                merged[section] = {**self._stored.get(section, {}), **self._manifest[section]}
        tmp = self.path / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(merged, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(self.path / MANIFEST)
        self._stored, self._has_work = merged, True
