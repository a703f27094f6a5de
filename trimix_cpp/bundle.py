"""Offline bundles: one file carrying a profile, its GGUF files and their lock, for a USB stick.

A bundle is an uncompressed tar (GGUF weights do not compress) whose first member,
``trimix-bundle.json``, is the manifest: the profile file's name, size and sha256, and the lock of
every GGUF file (role, provenance, name, size, sha256). Then come ``LANG.toml`` and
``models/NAME.gguf`` for each file the lock names, nothing else.

``install`` trusts nothing in the file it reads. It streams the tar once and refuses, before writing
a byte, a member with an absolute path, a ``..``, a link, a device or other special file, a name
the manifest does not list, a second copy of one, or a size other than the manifest's; each file's
sha256 is computed while it is copied into a scratch folder inside the models folder, and compared
with the manifest. Only when every listed member has arrived intact are the files renamed into
place (:func:`trimix_cpp.installer.commit_moves`), so any failure or Ctrl-C leaves the models folder
as it was and removes the scratch folder. Installing reads only the bundle: no network.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from .errors import TrimixError
from .installer import commit_moves, free_bytes, remove_tree, scratch_dir, sigint_held
from .lock import (
    CHUNK,
    FILE_NAME,
    SHA256,
    FileRecord,
    Lock,
    RoleLock,
    now,
    parse_lock,
    read_lock,
    sha256_file,
    stat_key,
    write_lock,
)
from .profiles import PACKAGE_PREFIX, Profile, find_profile, install_dir, load_profile, user_profiles_dir
from .sources import split_parts

Progress = Callable[[str, int, int], None]

MANIFEST = "trimix-bundle.json"
FORMAT = "trimix-bundle"
VERSION = 1
MAX_MANIFEST = 4 << 20
MAX_PROFILE = 1 << 20


class BundleError(TrimixError):
    """A bundle that cannot be installed: damaged, truncated, or carrying something it must not."""


def _lock_for(profile: Profile, role: str, path: Path) -> RoleLock:
    """The role's lock entry from the lock beside its file, or a new one for a file placed by hand
    (hashed now), covering every part of a split file."""
    lock = read_lock(path.parent, profile.lang)
    if lock is not None and role in lock.roles and lock.roles[role].main_file == path.name:
        return lock.roles[role]
    names = [path.name]
    split = split_parts(path.name)
    if split is not None:
        from .sources import part_name

        names = [part_name(split[0], i + 1, split[1]) for i in range(split[1])]
    files = []
    for n in names:
        p = path.parent / n
        if not p.is_file():
            raise TrimixError(f"{p} is missing (part of the split GGUF file {path.name})")
        files.append(FileRecord(n, p.stat().st_size, sha256_file(p)))
    return RoleLock(role=role, kind="local", files=files)


class _HashingReader(io.RawIOBase):
    """A file read through sha256 and a progress report, for ``tarfile.addfile``."""

    def __init__(self, f: BinaryIO, label: str, total: int, progress: Progress | None) -> None:
        self.f, self.label, self.total, self.progress = f, label, total, progress
        self.h, self.done = hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.h.update(data)
        self.done += len(data)
        if self.progress is not None:
            self.progress(self.label, self.done, self.total)
        return data


def make_bundle(profile: Profile, out: Path, progress: Progress | None = None) -> Path:
    """Write ``out``: the manifest, the profile and every GGUF file of the profile, each file checked
    against its lock while it is copied. Written beside, then renamed."""
    for role, ref in profile.models.items():
        if ref.startswith(PACKAGE_PREFIX) or "/" in ref or "\\" in ref:
            raise TrimixError(
                f"profile {profile.lang}: [models] {role} = {ref!r} is not a plain file name; a bundle installs "
                "files into the models folder under the names its profile gives, so it takes profiles that name "
                "files only"
            )
    paths = profile.paths()
    roles = {role: _lock_for(profile, role, path) for role, path in paths.items()}
    profile_bytes = profile.path.read_bytes()
    lock = Lock(profile.lang, "bundle", roles, now())
    lock_data = json.loads(lock.to_json())
    for r in lock_data["roles"].values():
        for f in r["files"]:
            f.pop("stat", None)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "profile": {
            "name": f"{profile.lang}.toml",
            "size": len(profile_bytes),
            "sha256": hashlib.sha256(profile_bytes).hexdigest(),
        },
        "lock": lock_data,
    }
    out = out.expanduser()
    if out.is_dir():
        raise TrimixError(
            f"{out} is a folder; give the bundle's file name, e.g. {out / (profile.lang + '.trimix.tar')}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            _add_bytes(tar, MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False).encode())
            _add_bytes(tar, f"{profile.lang}.toml", profile_bytes)
            for role, r in roles.items():
                folder = paths[role].parent
                for f in r.files:
                    path = folder / f.name
                    if path.stat().st_size != f.size:
                        raise TrimixError(
                            f"{path} has {path.stat().st_size:,} bytes, its lock says {f.size:,}; "
                            f"run trimix models verify --lang {profile.lang}"
                        )
                    info = tarfile.TarInfo(f"models/{f.name}")
                    info.size, info.mode, info.mtime = f.size, 0o644, int(path.stat().st_mtime)
                    with open(path, "rb") as fh:
                        reader = _HashingReader(fh, f.name, f.size, progress)
                        tar.addfile(info, reader)
                    if reader.h.hexdigest() != f.sha256:
                        raise TrimixError(
                            f"{path} does not match the sha256 its lock records, so it is not bundled; "
                            f"run trimix models verify --lang {profile.lang}"
                        )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


@dataclass
class Installed:
    lang: str
    models_dir: Path
    lock: Lock
    profile_path: Path
    profile_written: bool
    files: list[str]
    already_present: list[str]


def _check_member(m: tarfile.TarInfo, where: str) -> str:
    """The member's name when it is a plain file with a safe relative name; otherwise one line."""
    name = m.name
    if name.startswith("/") or PurePosixPath(name).is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise BundleError(f"{where}: member {name!r} has an absolute path; refusing the bundle")
    if ".." in PurePosixPath(name).parts or "\\" in name:
        raise BundleError(f"{where}: member {name!r} points outside the folder (..); refusing the bundle")
    if m.issym() or m.islnk():
        raise BundleError(f"{where}: member {name!r} is a link (to {m.linkname!r}); refusing the bundle")
    if m.isdev() or m.isfifo():
        raise BundleError(f"{where}: member {name!r} is a device or pipe; refusing the bundle")
    if m.issparse() or not m.isfile():
        raise BundleError(f"{where}: member {name!r} is not a plain file; refusing the bundle")
    return name


def _read_manifest(tar: tarfile.TarFile, where: str) -> tuple[dict, Lock]:
    m = tar.next()
    if m is None:
        raise BundleError(f"{where} is empty, not a trimix bundle")
    name = _check_member(m, where)
    if name != MANIFEST or m.size > MAX_MANIFEST:
        raise BundleError(f"{where} is not a trimix bundle (its first member is {name!r}, not {MANIFEST})")
    f = tar.extractfile(m)
    assert f is not None
    try:
        data = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BundleError(f"{where}: {MANIFEST} is not JSON; the bundle is damaged") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise BundleError(f"{where} is not a trimix bundle of version {VERSION}")
    lock = parse_lock(json.dumps(data.get("lock")), f"{where}: {MANIFEST}")
    prof = data.get("profile")
    if (
        not isinstance(prof, dict)
        or prof.get("name") != f"{lock.lang}.toml"
        or not isinstance(prof.get("size"), int)
        or not 0 < prof["size"] <= MAX_PROFILE
        or not isinstance(prof.get("sha256"), str)
        or not SHA256.fullmatch(prof["sha256"])
    ):
        raise BundleError(f"{where}: {MANIFEST} describes no profile {lock.lang}.toml; the bundle is damaged")
    for f in lock.files():
        if not FILE_NAME.fullmatch(f.name) or not f.name.endswith(".gguf"):
            raise BundleError(f"{where}: the lock names {f.name!r}, not a GGUF file name; refusing the bundle")
    return data, lock


def _copy_checked(src: BinaryIO, dst: Path, size: int, sha256: str, label: str, progress: Progress | None) -> None:
    h = hashlib.sha256()
    done = 0
    with open(dst, "wb") as out:
        while done < size:
            chunk = src.read(min(CHUNK, size - done))
            if not chunk:
                raise BundleError(f"{label} ends after {done:,} of {size:,} bytes: the bundle is truncated")
            h.update(chunk)
            out.write(chunk)
            done += len(chunk)
            if progress is not None:
                progress(label, done, size)
    if h.hexdigest() != sha256:
        raise BundleError(f"{label} does not match the sha256 in the bundle's lock: the bundle is damaged")


def install_bundle(
    source: Path, *, models_dir: Path | None = None, force: bool = False, progress: Progress | None = None
) -> Installed:
    """Install a bundle (a file, a pipe, or ``-`` for stdin) as described in the module docstring."""
    models_dir = models_dir or install_dir()
    where = "the bundle on stdin" if str(source) == "-" else str(source)
    if str(source) != "-" and not source.exists():
        raise BundleError(f"bundle not found: {source}")
    stream = sys.stdin.buffer if str(source) == "-" else open(source, "rb")
    scratch = None
    try:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|")
        except tarfile.TarError:
            raise BundleError(f"{where} is not a trimix bundle (not a tar file)") from None
        manifest, lock = _read_manifest(tar, where)
        expected = {f"models/{f.name}": f for f in lock.files()}
        prof_name = manifest["profile"]["name"]
        need, free = sum(f.size for f in lock.files()), free_bytes(models_dir)
        if need > free:
            raise BundleError(
                f"not enough disk in {models_dir}: the bundle holds {need / 2**30:.2f} GiB and "
                f"{free / 2**30:.2f} GiB are free; free some space or set $TRIMIX_MODELS to a larger disk"
            )
        scratch = scratch_dir(models_dir, "install")
        seen: set[str] = set()
        while (m := tar.next()) is not None:  # one pass over the stream (iterating would start over)
            name = _check_member(m, where)
            if name in seen:
                raise BundleError(f"{where}: member {name!r} appears twice; refusing the bundle")
            seen.add(name)
            if name == prof_name:
                size, digest, dst = manifest["profile"]["size"], manifest["profile"]["sha256"], scratch / prof_name
            elif name in expected:
                size, digest, dst = expected[name].size, expected[name].sha256, scratch / expected[name].name
            else:
                raise BundleError(f"{where}: member {name!r} is not named by the bundle's lock; refusing the bundle")
            if m.size != size:
                raise BundleError(f"{where}: member {name!r} has {m.size:,} bytes, the lock says {size:,}")
            f = tar.extractfile(m)
            assert f is not None
            _copy_checked(f, dst, size, digest, name, progress)
            tar.members.clear()  # a stream of many members: keep no list of them
        missing = sorted({*expected, prof_name} - seen)
        if missing:
            raise BundleError(f"{where} is truncated or incomplete: {', '.join(missing)} missing; nothing installed")
        return _commit(lock, scratch, models_dir, prof_name, force)
    except (tarfile.TarError, EOFError) as e:
        raise BundleError(f"{where} is truncated or damaged ({e}); nothing installed") from None
    except OSError as e:
        if e.errno is None or e.filename is None:
            raise
        raise BundleError(f"cannot install into {models_dir}: {e.strerror} ({e.filename}); nothing installed") from None
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
        if scratch is not None:
            remove_tree(scratch)


def _commit(lock: Lock, scratch: Path, models_dir: Path, prof_name: str, force: bool) -> Installed:
    """Everything arrived intact: decide where the profile goes, then move it all into place."""
    staged_profile = scratch / prof_name
    try:
        bundled = load_profile(staged_profile)
    except TrimixError as e:
        raise BundleError(f"the bundle's profile does not read: {e}") from None
    if bundled.lang != lock.lang:
        raise BundleError(
            "the bundle's profile is for {lang} {ours}, its lock for {theirs}",
            param="lang",
            ours=bundled.lang,
            theirs=lock.lang,
        )
    names = {f.name for f in lock.files()}
    for role, ref in bundled.models.items():
        if ref not in names or role not in lock.roles or lock.roles[role].main_file != ref:
            raise BundleError(f"the bundle's profile names {ref!r} for {role}, which its lock does not carry")
    # The profile: nothing to write when --lang already finds this very profile.
    try:
        current = find_profile(lock.lang)
        same = current.path.read_bytes() == staged_profile.read_bytes()
    except TrimixError:
        current, same = None, False
    profile_dest = current.path if same and current is not None else user_profiles_dir() / prof_name
    if not same and profile_dest.exists() and not force:
        raise BundleError(
            "{path} exists and differs from the bundle's profile; pass {force} to replace it",
            param="force",
            path=profile_dest,
        )
    # Files already here with the same content (another language's bundle shares them) stay.
    moves, present = [], []
    here = _recorded(models_dir)
    for f in lock.files():
        dst = models_dir / f.name
        if dst.exists():
            rec = here.get(f.name)
            if rec is not None and rec.sha256 == f.sha256 and rec.stat == stat_key(dst):
                present.append(f.name)
                continue
            if sha256_file(dst) == f.sha256:
                present.append(f.name)
                continue
            if not force:
                raise BundleError(
                    "{path} exists with other content; pass {force} to replace it", param="force", path=dst
                )
        moves.append((scratch / f.name, dst))
    if not same:
        moves.append((staged_profile, profile_dest))
        profile_dest.parent.mkdir(parents=True, exist_ok=True)
    with sigint_held():
        commit_moves(moves, scratch / ".replaced")
        for f in lock.files():
            f.stat = stat_key(models_dir / f.name)
        for r in lock.roles.values():
            r.origin = "bundle"
        lock.origin, lock.created = "bundle", now()
        write_lock(models_dir, lock)
    return Installed(lock.lang, models_dir, lock, profile_dest, not same, [f.name for f in lock.files()], present)


def _recorded(models_dir: Path) -> dict[str, FileRecord]:
    out: dict[str, FileRecord] = {}
    for p in sorted(models_dir.glob("*.lock.json")):
        try:
            lk = read_lock(models_dir, p.name[: -len(".lock.json")])
        except TrimixError:
            continue
        if lk is not None:
            out.update({f.name: f for f in lk.files()})
    return out
