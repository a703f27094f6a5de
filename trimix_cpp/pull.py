"""``trimix models pull``: a profile's models from the Hub into the models folder, with a lock file.

For every role whose ``[sources.ROLE]`` table names a repository (see :mod:`trimix_cpp.sources`):

1. plan (:func:`plan_pull`): a role whose installed files the lock already records for the same
   source, and which still verify, is done and needs no network (also for a file another
   language's lock in the same folder records, e.g. the 7B model every shipped profile shares);
   for the others the revision is resolved to a commit, the files to fetch are chosen, and the
   download, the conversion scratch and the result are sized so the disk is checked before
   anything starts;
2. fetch and build (:func:`run_pull`): downloads go to ``.pull/REPO@COMMIT/`` in the models folder
   (resumed there after any interruption) and every file is checked against its published hash;
   checkpoints are converted, then quantized, with :mod:`trimix_cpp.convert`;
3. install: only when every role is built are the results renamed into place under the names the
   profile resolves, and the lock ``LANG.lock.json`` is written beside them.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from . import hub
from .errors import TrimixError
from .installer import commit_moves, free_bytes, remove_tree, sigint_held
from .lock import FileRecord, Lock, RoleLock, now, quick_status, read_lock, sha256_file, verify_files, write_lock
from .profiles import PACKAGE_PREFIX, Profile, install_dir
from .sources import BITS_PER_WEIGHT, Source, part_name, split_parts

Progress = Callable[[str, int, int], None]

# What a checkpoint conversion reads: the config and tokenizer files and the safetensors weights
# (never pickled PyTorch files, which can run code when loaded).
CHECKPOINT_FILES = ("*.json", "*.safetensors", "tokenizer.model", "merges.txt", "vocab.txt", "*.tiktoken")
STAGING = ".pull"


@dataclass
class RolePlan:
    """What pulling one role takes."""

    role: str
    source: Source
    targets: list[str]  # installed file names (the parts of a split file, in order)
    status: str  # "installed", "reuse" (recorded by another lock here) or "fetch"
    snapshot: hub.Snapshot | None = None
    fetch: list[hub.RemoteFile] = field(default_factory=list)
    download_bytes: int = 0  # still to download (finished and partial downloads subtracted)
    scratch_bytes: int = 0  # the full-precision GGUF between conversion and quantization
    result_bytes: int = 0
    lock: RoleLock | None = None

    @property
    def commit(self) -> str | None:
        return self.snapshot.commit if self.snapshot else (self.lock.commit if self.lock else None)


@dataclass
class PullPlan:
    profile: Profile
    models_dir: Path
    roles: list[RolePlan]
    skipped: dict[str, str]  # role -> why it is not pulled
    free_bytes: int

    @property
    def to_fetch(self) -> list[RolePlan]:
        return [r for r in self.roles if r.status == "fetch"]

    @property
    def needed_bytes(self) -> int:
        """Disk the pull still needs at its peak: what stays (a GGUF download is the result; a converted
        checkpoint's result), plus the largest role's checkpoint download and conversion scratch (a
        downloaded checkpoint is deleted once it is converted)."""
        fetch = self.to_fetch
        if not fetch:
            return 0
        stays = sum(r.download_bytes if r.source.kind == "gguf" else r.result_bytes for r in fetch)
        passing = max(0 if r.source.kind == "gguf" else r.download_bytes + r.scratch_bytes for r in fetch)
        return stays + passing


def _target(profile: Profile, role: str) -> str:
    ref = profile.models[role]
    if ref.startswith(PACKAGE_PREFIX) or "/" in ref or "\\" in ref or ref in (".", ".."):
        raise TrimixError(
            f"profile {profile.lang}: [models] {role} = {ref!r} is not a plain file name; pull installs files "
            "into the models folder under the name the profile gives, so name the file only"
        )
    return ref


def _matches(r: RoleLock, src: Source, target: str) -> bool:
    return (
        r.kind == src.kind
        and r.repo == src.repo
        and r.revision == src.revision
        and r.type == src.type
        and r.gguf == src.gguf
        and r.main_file == target
    )


def _verified(lock: Lock, role: str, models_dir: Path, progress: Progress | None) -> bool:
    if quick_status(lock, models_dir, role) == "verified":
        return True
    return all(c.status == "ok" for c in verify_files(lock, models_dir, progress, roles=[role]))


def _other_locks(models_dir: Path, lang: str) -> list[Lock]:
    locks = []
    for p in sorted(models_dir.glob("*.lock.json")) if models_dir.is_dir() else []:
        other = p.name[: -len(".lock.json")]
        if other == lang:
            continue
        try:
            lk = read_lock(models_dir, other)
        except TrimixError:
            continue
        if lk is not None:
            locks.append(lk)
    return locks


def _select_gguf(snap: hub.Snapshot, src: Source, target: str) -> tuple[list[hub.RemoteFile], list[str]]:
    """The file(s) the pattern names, and the names they are installed under: the profile's name
    for one file; for a split file, the parts renamed after the profile's first-part name."""
    chosen = sorted((f for f in snap.files if src.matches(f.name)), key=lambda f: f.name)
    if not chosen:
        ggufs = [f.name for f in snap.files if f.name.endswith(".gguf")]
        raise TrimixError(
            f"{src.repo}@{snap.commit[:12]}: no file matches {src.gguf!r} "
            f"(its GGUF files: {', '.join(ggufs[:12]) or 'none'})"
        )
    if len(chosen) == 1:
        return chosen, [target]
    firsts = [split_parts(PurePosixPath(f.name).name) for f in chosen]
    first = firsts[0]
    if first is None or first[1] != len(chosen):
        raise TrimixError(
            f"{src.repo}: {src.gguf!r} matches {len(chosen)} files that are not the parts of one split GGUF file "
            f"({', '.join(f.name for f in chosen[:6])}); make the pattern match one file"
        )
    want = split_parts(target)
    if want is None or want[1] != len(chosen):
        raise TrimixError(
            f"{src.repo}: {src.gguf!r} is a GGUF file split in {len(chosen)} parts; llama.cpp finds the parts by "
            f"name, so the profile must name the first one, e.g. "
            f"{part_name(PurePosixPath(target).stem, 1, len(chosen))}"
        )
    return chosen, [part_name(want[0], i + 1, len(chosen)) for i in range(len(chosen))]


def _select_checkpoint(snap: hub.Snapshot) -> list[hub.RemoteFile]:
    chosen = [
        f for f in snap.files if "/" not in f.name and any(fnmatch.fnmatchcase(f.name, p) for p in CHECKPOINT_FILES)
    ]
    if not any(f.name.endswith(".safetensors") for f in chosen):
        raise TrimixError(
            f"{snap.repo}@{snap.commit[:12]} has no .safetensors weights; the converter reads safetensors only "
            "(or point [sources] at a repository that publishes GGUF files, with gguf = PATTERN)"
        )
    if not any(f.name == "config.json" for f in chosen):
        raise TrimixError(f"{snap.repo}@{snap.commit[:12]} has no config.json, so it is not a checkpoint to convert")
    return chosen


def _key_dir(models_dir: Path, snap: hub.Snapshot) -> Path:
    return models_dir / STAGING / f"{snap.repo.replace('/', '--')}@{snap.commit}"


def _remaining(rf: hub.RemoteFile, folder: Path) -> int:
    name = PurePosixPath(rf.name).name
    if (folder / name).is_file():
        return 0
    part = folder / (name + ".part")
    return max(0, (rf.size or 0) - (part.stat().st_size if part.is_file() else 0))


def plan_pull(
    profile: Profile,
    models_dir: Path | None = None,
    *,
    roles: list[str] | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> PullPlan:
    """What the pull would do, resolving revisions on the Hub only for roles not already installed.
    ``roles`` limits it to those (e.g. without the large base model only ``trimix4`` uses)."""
    models_dir = models_dir or install_dir()
    for r in roles or []:
        if r not in profile.models:
            raise TrimixError(
                "{roles} {role}: profile {lang} has no such role (it has {known})",
                param="roles",
                role=r,
                lang=profile.lang,
                known=", ".join(profile.models),
            )
    wanted = [r for r in profile.models if roles is None or r in roles]
    roles_with_source = [r for r in wanted if r in profile.origins]
    skipped = {r: "not asked for (--role)" for r in profile.models if r not in wanted}
    skipped |= {r: f"no [sources.{r}] table; place its file by hand" for r in wanted if r not in profile.origins}
    if not roles_with_source:
        raise TrimixError(
            f"profile {profile.lang} ({profile.path}) says where none of its models come from: add "
            "[sources.ROLE] tables with repo, revision and type (or gguf), see models/README.md"
        )
    own = read_lock(models_dir, profile.lang)
    others = _other_locks(models_dir, profile.lang)
    plans = []
    for role in roles_with_source:
        src = profile.origins[role]
        target = _target(profile, role)
        if own is not None and role in own.roles and _matches(own.roles[role], src, target):
            if _verified(own, role, models_dir, progress):
                plans.append(
                    RolePlan(role, src, [f.name for f in own.roles[role].files], "installed", lock=own.roles[role])
                )
                continue
        shared = next(
            (lk for lk in others for r in lk.roles.values() if _matches(r, src, target)),
            None,
        )
        if shared is not None:
            shared_role = next(r for r in shared.roles if _matches(shared.roles[r], src, target))
            if _verified(shared, shared_role, models_dir, progress):
                rl = RoleLock(**{**shared.roles[shared_role].__dict__, "role": role})
                plans.append(RolePlan(role, src, [f.name for f in rl.files], "reuse", lock=rl))
                continue
        recorded = {f.name for lk in [own, *others] if lk is not None for f in lk.files()}
        if (models_dir / target).exists() and target not in recorded and not force:
            raise TrimixError(
                "{path} exists and no lock file records it (placed by hand?): move it away, or "
                "pass {force} to replace it with the pulled file",
                param="force",
                path=models_dir / target,
            )
        snap = hub.resolve(src.repo, src.revision)
        key = _key_dir(models_dir, snap)
        if src.kind == "gguf":
            fetch, targets = _select_gguf(snap, src, target)
            download = sum(_remaining(f, key / "src") for f in fetch)
            result = sum(f.size or 0 for f in fetch)
            plans.append(RolePlan(role, src, targets, "fetch", snap, fetch, download, 0, result))
        else:
            fetch = _select_checkpoint(snap)
            weights = sum(f.size or 0 for f in fetch if f.name.endswith(".safetensors"))
            # Checkpoints are published in 16-bit (the Qwen2.5 ones in bfloat16): a 16-bit GGUF is
            # about the weights' size, and the result scales with the type's bits per weight.
            result = int(weights * BITS_PER_WEIGHT[src.type or "F16"] / 16)
            done = (key / "out" / target).is_file()
            download = 0 if done else sum(_remaining(f, key / "src") for f in fetch)
            scratch = 0 if done or _direct(src.type) else weights
            plans.append(RolePlan(role, src, [target], "fetch", snap, fetch, download, scratch, result))
    return PullPlan(profile, models_dir, plans, skipped, free_bytes(models_dir))


# Types the converter writes straight from the checkpoint; any other is written in 16 bits first and
# then quantized by llama.cpp, which needs that file as scratch.
DIRECT_TYPES = ("F32", "F16", "BF16", "Q8_0")


def _direct(gguf_type: str | None) -> bool:
    return (gguf_type or "F16") in DIRECT_TYPES


def versions(converted: bool) -> dict[str, str]:
    """The versions of what produced the files, for the lock: trimix (whose converter made a
    converted file), llama.cpp's Python binding (its quantizer), the Hub client and gguf."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    out = {"trimix": __version__}
    if converted:
        out["converter"] = f"trimix_cpp.convert {__version__}"
    for dist in ("llama-cpp-python", "huggingface_hub", "gguf"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def _convert(src_dir: Path, out: Path, gguf_type: str, role: str, progress: Progress | None) -> None:
    """Checkpoint -> GGUF of ``gguf_type`` with trimix's converter (which quantizes through
    llama.cpp when the type needs it)."""
    try:
        from .convert import convert_checkpoint
    except ImportError:
        raise TrimixError(
            "this trimix has no checkpoint converter (trimix_cpp.convert), so it can pull only repositories "
            "that publish GGUF files ([sources] gguf = PATTERN)"
        ) from None

    def report(stage: str, done: int, total: int) -> None:
        if progress is not None:
            progress(f"{role}: {stage}", done, total)

    convert_checkpoint(src_dir, out, out_type=gguf_type.lower(), force=True, progress=report)


def _build(plan: RolePlan, models_dir: Path, progress: Progress | None) -> tuple[RoleLock, list[tuple[Path, Path]]]:
    """Download (resuming) and check a role's files, convert them if they are a checkpoint, and
    leave the result(s) in the staging folder; returns the lock entry and the moves to install."""
    snap = plan.snapshot
    assert snap is not None
    key = _key_dir(models_dir, snap)
    src_dir, out_dir = key / "src", key / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    src = plan.source
    if src.kind == "gguf":
        results = []
        for rf, target in zip(plan.fetch, plan.targets):
            staged = out_dir / target
            if not staged.is_file():  # staged by an earlier run that stopped before installing
                got = hub.download(snap, rf, src_dir / PurePosixPath(rf.name).name, progress)
                got.replace(staged)
            # the download matched the published sha256, which is therefore the result's
            results.append(FileRecord(target, staged.stat().st_size, rf.sha256 or sha256_file(staged, progress)))
        sources = [FileRecord(rf.name, r.size, r.sha256) for rf, r in zip(plan.fetch, results)]
    else:
        staged = out_dir / plan.targets[0]
        marker = staged.with_name(staged.name + ".json")
        mark = json.loads(marker.read_text()) if marker.is_file() and staged.is_file() else {}
        if mark.get("type") != src.type:  # not converted yet, or by an earlier run for another type
            paths = [hub.download(snap, rf, src_dir / rf.name, progress) for rf in plan.fetch]
            # every source file's sha256 for the lock: published for LFS files, computed for the small
            # ones (which were checked against their git blob id)
            sources = [
                FileRecord(rf.name, p.stat().st_size, rf.sha256 or sha256_file(p)) for rf, p in zip(plan.fetch, paths)
            ]
            _convert(src_dir, staged, src.type or "F16", plan.role, progress)
            digest = sha256_file(staged, progress, f"hashing {staged.name}")
            mark = {"type": src.type, "sha256": digest, "size": staged.stat().st_size}
            mark["sources"] = [asdict(f) for f in sources]
            marker.write_text(json.dumps(mark))
            remove_tree(src_dir)  # the checkpoint is converted: free its space for the next role
        sources = [FileRecord(**f) for f in mark["sources"]]
        results = [FileRecord(staged.name, int(mark["size"]), str(mark["sha256"]))]
    lock = RoleLock(
        role=plan.role,
        kind=src.kind,
        files=results,
        repo=src.repo,
        revision=src.revision,
        commit=snap.commit,
        type=src.type,
        gguf=src.gguf,
        source_files=sources,
        versions=versions(converted=src.kind == "checkpoint"),
    )
    moves = [(out_dir / f.name, models_dir / f.name) for f in results]
    return lock, moves


def run_pull(plan: PullPlan, progress: Progress | None = None) -> Lock:
    """Carry out a plan: fetch and build every role, then install them all and write the lock."""
    models_dir = plan.models_dir
    if plan.to_fetch and plan.needed_bytes > plan.free_bytes:
        raise TrimixError(
            f"not enough disk in {models_dir}: the pull needs {plan.needed_bytes / 2**30:.1f} GiB "
            f"(download + conversion scratch + result) and {plan.free_bytes / 2**30:.1f} GiB are free; "
            "free some space or set $TRIMIX_MODELS to a larger disk"
        )
    lock = read_lock(models_dir, plan.profile.lang) or Lock(plan.profile.lang, "pull", {}, now())
    built: list[tuple[RoleLock, list[tuple[Path, Path]]]] = [_build(r, models_dir, progress) for r in plan.to_fetch]
    for r in plan.roles:
        if r.status in ("installed", "reuse") and r.lock is not None:
            lock.roles[r.role] = r.lock
    if not built:
        before = read_lock(models_dir, plan.profile.lang)
        if before is None or before.to_json() != lock.to_json():
            write_lock(models_dir, lock)  # another language's files recorded here, or fresh verify stamps
        return lock
    backup = models_dir / STAGING / "replaced"
    with sigint_held():
        commit_moves([m for _, moves in built for m in moves], backup)
        for role_lock, _ in built:
            for f in role_lock.files:
                f.stat = _stat(models_dir / f.name)
            lock.roles[role_lock.role] = role_lock
        lock.origin, lock.created = "pull", now()
        write_lock(models_dir, lock)
    for r in plan.to_fetch:
        assert r.snapshot is not None
        remove_tree(_key_dir(models_dir, r.snapshot))
    remove_tree(backup)
    try:
        (models_dir / STAGING).rmdir()
    except OSError:
        pass
    return lock


def _stat(path: Path) -> list[int]:
    from .lock import stat_key

    return stat_key(path)


# --type: another GGUF type than the profile's -------------------------------------------------------


def parse_type_overrides(types: list[str], profile: Profile) -> dict[str, str]:
    """``--type TYPE`` (every converted role) or ``--type ROLE=TYPE``, checked against the profile."""
    from .sources import normalize_type

    out: dict[str, str] = {}
    converted = [r for r in profile.models if r in profile.origins and profile.origins[r].kind == "checkpoint"]
    for v in types:
        role, sep, t = v.rpartition("=")
        roles = [role.replace("-", "_")] if sep else converted
        for r in roles:
            if r not in profile.models:
                raise TrimixError(
                    "{types} {given}: profile {lang} has no role {role!r}",
                    param="types",
                    given=v,
                    lang=profile.lang,
                    role=role,
                )
            if r not in profile.origins or profile.origins[r].kind != "checkpoint":
                raise TrimixError(
                    "{types} {given}: {role} is not converted from a checkpoint (it is a published GGUF file or has no "
                    "[sources] table), so its type is the file's",
                    param="types",
                    given=v,
                    role=r,
                )
            out[r] = normalize_type(t)
    if types and not out:
        raise TrimixError(
            "{types}: profile {lang} converts no checkpoint, so there is no type to choose",
            param="types",
            lang=profile.lang,
        )
    return out


def _renamed(name: str, old: str | None, new: str) -> str:
    """The profile's file name with its type replaced (``X-Q8_0.gguf`` -> ``X-Q4_K_M.gguf``), or the
    type added before ``.gguf`` when the name does not carry the old one."""
    import re

    if old and re.search(re.escape(old), name, flags=re.IGNORECASE):
        return re.sub(re.escape(old), new, name, count=1, flags=re.IGNORECASE)
    stem = name[: -len(".gguf")] if name.endswith(".gguf") else name
    return f"{stem}-{new}.gguf"


def with_types(profile: Profile, types: dict[str, str]) -> Profile:
    """The profile as it reads with other types: each such role's file renamed after its type."""
    from dataclasses import replace

    models, origins = dict(profile.models), dict(profile.origins)
    for role, t in types.items():
        old = origins[role]
        if old.type == t:
            continue
        models[role] = _renamed(models[role], old.type, t)
        origins[role] = replace(old, type=t)
    return replace(profile, models=models, origins=origins)


def save_user_profile(original: Profile, changed: Profile) -> Path | None:
    """Save ``changed``: over the original when it is the user's own file, else (a shipped profile) as
    the user's profile, which shadows it. Only the lines of the changed ``[models]`` names and
    ``[sources.ROLE]`` types are rewritten in the original text, and the result is read back and
    compared. None when nothing changed."""
    import os
    import re

    from .profiles import SHIPPED_DIR, load_profile, toml_string, user_profiles_dir

    if changed.models == original.models and changed.origins == original.origins:
        return None
    lines = original.path.read_text(encoding="utf-8").splitlines(keepends=True)
    table, out = "", []
    for line in lines:
        head = re.fullmatch(r"\s*\[([^\[\]]+)\]\s*(#.*)?\n?", line)
        if head:
            table = head[1].strip()
        key = re.match(r"\s*([A-Za-z_]+)\s*=", line)
        if key and table == "models" and key[1] in changed.models and changed.models[key[1]] != original.models[key[1]]:
            line = f"{key[1]} = {toml_string(changed.models[key[1]])}\n"
        elif key and key[1] == "type" and table.startswith("sources."):
            role = table.split(".", 1)[1]
            if role in changed.origins and changed.origins[role] != original.origins.get(role):
                line = f"type = {toml_string(changed.origins[role].type or '')}\n"
        out.append(line)
    shipped = original.path.resolve().parent == SHIPPED_DIR.resolve()
    dest = user_profiles_dir() / f"{original.lang}.toml" if shipped else original.path
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text("".join(out), encoding="utf-8")
        back = load_profile(tmp)
        if back.models != changed.models or back.origins != changed.origins:
            raise TrimixError(
                f"could not rewrite {original.path} for the new types (its layout is unusual); copy it to {dest} "
                "and change the [models] names and [sources] types by hand"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest
