"""The lock file: what every installed GGUF file of a profile is, where it came from, and its sha256.

``trimix models pull`` writes ``LANG.lock.json`` in the models folder, next to the files; a bundle
carries the same record and ``trimix models install`` writes it on the other machine. For each role it
keeps the source repository and the commit its revision resolved to, every source file's size and
sha256, the type produced, the versions of trimix, its converter and llama.cpp that produced it, and
each result file's size and sha256. ``trimix models verify`` recomputes the hashes from it, offline.

Hashing a 5 GB file takes tens of seconds, so after a file verifies its size, modification time and
inode are kept beside the hash (``stat``): ``models list`` reports a file as verified while these are
unchanged, without reading it again, and as changed otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import TrimixError
from .profiles import Profile, check_lang

LOCK_VERSION = 1
SHA256 = re.compile(r"[0-9a-f]{64}")
# A file name the lock may name: one plain component, so a lock (which can arrive inside a bundle)
# never points outside the models folder.
FILE_NAME = re.compile(r"[\w][\w.+-]{0,250}")
CHUNK = 1 << 20

Progress = Callable[[str, int, int], None]


@dataclass
class FileRecord:
    """One file: its name (in the models folder, or in the source repository), size and sha256."""

    name: str
    size: int
    sha256: str
    stat: list[int] | None = None  # [size, mtime_ns, inode] when it last verified (installed files only)


@dataclass
class RoleLock:
    """One role's provenance and result."""

    role: str
    kind: str  # "checkpoint", "gguf", or "local" (placed by hand, bundled as it was)
    files: list[FileRecord]
    repo: str | None = None
    revision: str | None = None
    commit: str | None = None
    type: str | None = None
    gguf: str | None = None
    source_files: list[FileRecord] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    origin: str = "pull"  # how the files came here: "pull", or "bundle" (installed from one)

    @property
    def main_file(self) -> str:
        """The file the profile names (the first part, for a split GGUF file)."""
        return self.files[0].name


@dataclass
class Lock:
    lang: str
    origin: str  # "pull" or "bundle"
    roles: dict[str, RoleLock]
    created: str = ""
    lock_version: int = LOCK_VERSION

    def files(self) -> list[FileRecord]:
        return [f for r in self.roles.values() for f in r.files]

    def to_json(self) -> str:
        data = {"lock_version": self.lock_version, "lang": self.lang, "origin": self.origin, "created": self.created}
        data["roles"] = {role: asdict(r) for role, r in self.roles.items()}
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def lock_path(models_dir: Path, lang: str) -> Path:
    return models_dir / f"{lang}.lock.json"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _file(data: object, where: str, installed: bool) -> FileRecord:
    if not isinstance(data, dict):
        raise TrimixError(f"{where}: a file entry must be a table")
    name, size, digest = data.get("name"), data.get("size"), data.get("sha256")
    ok_name = isinstance(name, str) and (FILE_NAME.fullmatch(name) if installed else name and ".." not in name)
    if not ok_name:
        raise TrimixError(f"{where}: bad file name {name!r} (a plain file name, no folders)")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise TrimixError(f"{where}: bad size {size!r} for {name}")
    if not isinstance(digest, str) or not SHA256.fullmatch(digest):
        raise TrimixError(f"{where}: bad sha256 {digest!r} for {name}")
    st = data.get("stat")
    if not (isinstance(st, list) and len(st) == 3 and all(isinstance(x, int) for x in st)):
        st = None
    return FileRecord(name=name, size=size, sha256=digest, stat=st)


def parse_lock(text: str, where: str) -> Lock:
    """A lock read back, every name, size and hash checked (a bundle's lock comes from anywhere)."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrimixError(f"{where} is not a trimix lock file (not JSON: {e})") from None
    if not isinstance(data, dict) or data.get("lock_version") != LOCK_VERSION:
        raise TrimixError(f"{where} is not a trimix lock file of version {LOCK_VERSION}")
    lang = check_lang(data.get("lang"), f"{where}: lang")
    roles: dict[str, RoleLock] = {}
    raw_roles = data.get("roles")
    if not isinstance(raw_roles, dict) or not raw_roles:
        raise TrimixError(f"{where}: no roles")
    from .fusion import ROLES

    seen: set[str] = set()
    for role, r in raw_roles.items():
        if role not in ROLES or not isinstance(r, dict):
            raise TrimixError(f"{where}: unknown role {role!r}")
        files = [_file(f, f"{where} {role}", True) for f in r.get("files") or []]
        if not files:
            raise TrimixError(f"{where}: role {role} names no file")
        for f in files:
            if f.name in seen:
                raise TrimixError(f"{where}: {f.name} is named twice")
            seen.add(f.name)
        sources = [_file(f, f"{where} {role} source", False) for f in r.get("source_files") or []]
        text_fields = {k: r.get(k) for k in ("repo", "revision", "commit", "type", "gguf")}
        if not all(v is None or isinstance(v, str) for v in text_fields.values()):
            raise TrimixError(f"{where}: role {role} has a non-text field")
        versions = r.get("versions") or {}
        roles[role] = RoleLock(
            role=role,
            origin="bundle" if r.get("origin") == "bundle" else "pull",
            kind=str(r.get("kind", "local")),
            files=files,
            source_files=sources,
            versions={str(k): str(v) for k, v in versions.items()} if isinstance(versions, dict) else {},
            **text_fields,
        )
    origin = data.get("origin")
    return Lock(
        lang=lang,
        origin=origin if origin in ("pull", "bundle") else "pull",
        roles=roles,
        created=str(data.get("created", "")),
    )


def read_lock(models_dir: Path, lang: str) -> Lock | None:
    path = lock_path(models_dir, lang)
    if not path.is_file():
        return None
    return parse_lock(path.read_text(encoding="utf-8"), str(path))


def write_lock(models_dir: Path, lock: Lock) -> Path:
    """Write beside, then rename: a reader sees the old lock or the new one, never half of one."""
    path = lock_path(models_dir, lock.lang)
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(lock.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def sha256_file(path: Path, progress: Progress | None = None, label: str | None = None) -> str:
    """The file's sha256, reading 1 MiB at a time; ``progress(label, done, total)`` after each."""
    h = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(label or path.name, done, total)
    return h.hexdigest()


@dataclass
class FileCheck:
    """The verdict on one file: ``ok``, ``missing``, ``size`` (wrong size) or ``sha256`` (different content)."""

    role: str
    name: str
    path: Path
    status: str
    detail: str = ""


def verify_files(
    lock: Lock, models_dir: Path, progress: Progress | None = None, roles: Iterable[str] | None = None
) -> list[FileCheck]:
    """Recompute every file's sha256 against the lock (offline), and remember which verified."""
    checks = []
    wanted = set(roles) if roles is not None else None
    for role, r in lock.roles.items():
        if wanted is not None and role not in wanted:
            continue
        for f in r.files:
            path = models_dir / f.name
            if not path.is_file():
                checks.append(FileCheck(role, f.name, path, "missing", f"{f.name} is not in {models_dir}"))
                continue
            size = path.stat().st_size
            if size != f.size:
                checks.append(FileCheck(role, f.name, path, "size", f"{size:,} bytes, the lock says {f.size:,}"))
                f.stat = None
                continue
            digest = sha256_file(path, progress)
            if digest != f.sha256:
                checks.append(FileCheck(role, f.name, path, "sha256", f"sha256 {digest}, the lock says {f.sha256}"))
                f.stat = None
                continue
            f.stat = stat_key(path)
            checks.append(FileCheck(role, f.name, path, "ok"))
    return checks


def quick_status(lock: Lock, models_dir: Path, role: str) -> str:
    """Without reading the files: ``verified`` when every file of the role is as it was when it last
    verified, ``changed`` when one was modified since, ``missing`` when one is gone."""
    r = lock.roles.get(role)
    if r is None:
        return "unlocked"
    for f in r.files:
        path = models_dir / f.name
        if not path.is_file():
            return "missing"
        if f.stat is None or stat_key(path) != f.stat:
            return "changed"
    return "verified"


def profile_roles_in_lock(profile: Profile, lock: Lock) -> dict[str, bool]:
    """For each role of the profile, whether the lock covers the very file name the profile names."""
    return {
        role: role in lock.roles and lock.roles[role].main_file == Path(ref).name
        for role, ref in profile.models.items()
    }


def provenance(profile: Profile) -> dict[str, str]:
    """For each role whose file is present: ``pulled``/``bundle`` with ``verified`` or ``changed``
    (the lock beside the file records it; see :func:`quick_status`), ``shipped`` (it comes with
    trimix: the demo trio), or ``by hand`` (no lock records it). Cheap: no file is read."""
    from .profiles import PACKAGE_PREFIX, SHIPPED_DIR

    out: dict[str, str] = {}
    for role in profile.models:
        try:
            path = profile.locate(role)
        except TrimixError:
            continue
        if profile.models[role].startswith(PACKAGE_PREFIX) or path.resolve().is_relative_to(SHIPPED_DIR.resolve()):
            out[role] = "shipped with trimix"
            continue
        try:
            lock = read_lock(path.parent, profile.lang)
        except TrimixError:
            lock = None
        if lock is None or role not in lock.roles or lock.roles[role].main_file != path.name:
            out[role] = "by hand"
            continue
        how = "pulled" if lock.roles[role].origin == "pull" else "bundle"
        out[role] = f"{how}, {quick_status(lock, path.parent, role)}"
    return out


def summarize(status: dict[str, str]) -> str:
    """One phrase for a profile: the common status, or each role's when they differ."""
    values = set(status.values())
    if not values:
        return ""
    if len(values) == 1:
        return values.pop()
    return "; ".join(f"{role.replace('_', '-')}: {s}" for role, s in status.items())
