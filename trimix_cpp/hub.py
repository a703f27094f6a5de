"""Resolving and downloading Hub repositories through ``huggingface_hub``, checking every byte.

``huggingface_hub`` brings the Hub's protocol: ``HF_ENDPOINT`` (a mirror, or the tests' stand-in),
``HF_TOKEN``, ``HF_HUB_OFFLINE``, its error types, and ``http_get``, which retries a dropped
connection with a Range request. Two things are added here:

- a download that stops (network gone, Ctrl-C) leaves ``NAME.part`` behind and the next run asks
  only for the rest, so a 15 GB checkpoint never starts over;
- nothing is trusted unchecked: each file's content is hashed and compared with what the Hub
  publishes for it, the sha256 of an LFS file or the git blob id (sha1 of ``blob SIZE\\0`` + content)
  of a small one. A file that differs is deleted and refused.

Every failure is one :class:`~trimix_cpp.errors.TrimixError` line naming the repository.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .errors import TrimixError

Progress = Callable[[str, int, int], None]
CHUNK = 1 << 20
COMMIT = re.compile(r"[0-9a-f]{40}")


class HubError(TrimixError):
    """The Hub (or the network to it) refused or failed a request."""


@dataclass(frozen=True)
class RemoteFile:
    """A file of a repository at one commit, with the hash the Hub publishes for it."""

    name: str
    size: int | None
    sha256: str | None  # LFS files
    blob_id: str | None  # git blob id (sha1), the only hash of a small non-LFS file


@dataclass(frozen=True)
class Snapshot:
    """A repository's revision resolved to a commit, with its file list."""

    repo: str
    revision: str
    commit: str
    files: tuple[RemoteFile, ...]


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set: never touch the network."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _offline_error(repo: str) -> HubError:
    return HubError(
        f"{repo}: HF_HUB_OFFLINE is set and this model is not installed here; pull it on a machine with "
        "network and bring it over with trimix models bundle / trimix models install, or unset HF_HUB_OFFLINE"
    )


def hub_error(e: BaseException, repo: str, revision: str | None = None) -> HubError:
    """One line for a failed Hub request, naming the repository and what to do."""
    from huggingface_hub import errors as hf_errors

    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, hf_errors.OfflineModeIsEnabled):
        return _offline_error(repo)
    if isinstance(e, hf_errors.RevisionNotFoundError):
        return HubError(f"{repo}: no revision {revision!r} on {endpoint()} (check revision in the profile's [sources])")
    if isinstance(e, hf_errors.GatedRepoError):
        return HubError(
            f"{repo} is gated ({status}): accept its conditions on the repository page, then set HF_TOKEN to "
            "a token of that account"
        )
    if status == 401:
        return HubError(
            f"{repo}: the Hub refused access (401): the repository is private, gated or missing; set HF_TOKEN "
            "to a token that can read it, or check the repo id in the profile's [sources]"
        )
    if isinstance(e, hf_errors.RepositoryNotFoundError) or status == 404:
        return HubError(
            f"{repo}: no such repository on {endpoint()} (404); check the repo id in the profile's [sources]"
        )
    if status == 403:
        return HubError(f"{repo}: the Hub refused access (403); check that HF_TOKEN's token may read this repository")
    if status is not None:
        return HubError(f"{repo}: the Hub answered HTTP {status}; try again later")
    name = type(e).__name__
    return HubError(
        f"{repo}: cannot reach {endpoint()} ({name}: {e}); check the network, or set HF_HUB_OFFLINE=1 to use "
        "only what is installed"
    )


def _catching(repo: str, revision: str | None, fn: Callable):
    from huggingface_hub import errors as hf_errors

    try:
        return fn()
    except hf_errors.HfHubHTTPError as e:
        raise hub_error(e, repo, revision) from None
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
            raise TrimixError(f"{repo}: cannot write the download ({e.strerror}: {e.filename or ''})") from None
        raise hub_error(e, repo, revision) from None
    except (hf_errors.OfflineModeIsEnabled, ValueError) as e:
        raise hub_error(e, repo, revision) from None
    except Exception as e:  # httpx2's transport errors (connection refused, reset, timeout)
        if type(e).__module__.split(".")[0].startswith("httpx"):
            raise hub_error(e, repo, revision) from None
        raise


def resolve(repo: str, revision: str) -> Snapshot:
    """The commit ``revision`` points at now, and the files there with their published hashes."""
    if offline():
        raise _offline_error(repo)
    from huggingface_hub import HfApi

    info = _catching(repo, revision, lambda: HfApi().model_info(repo, revision=revision, files_metadata=True))
    if not isinstance(info.sha, str) or not COMMIT.fullmatch(info.sha) or info.siblings is None:
        # the commit names a folder here, so it must be what the Hub sends: 40 hexadecimal digits
        raise HubError(f"{repo}: the Hub's answer has no commit or file list ({endpoint()} is not a Hub endpoint?)")
    files = tuple(
        RemoteFile(
            name=s.rfilename,
            size=s.lfs.size if s.lfs is not None else s.size,
            sha256=s.lfs.sha256 if s.lfs is not None else None,
            blob_id=s.blob_id,
        )
        for s in info.siblings
    )
    return Snapshot(repo=repo, revision=revision, commit=info.sha, files=files)


def _bar(progress: Progress | None, label: str):
    """A class shaped like the tqdm bar ``http_get`` drives, reporting to ``progress``."""

    class Bar:
        def __init__(self, *, total: int | None = None, initial: int = 0, **_: object) -> None:
            self.n, self.total = initial, total or 0
            self._report()

        def _report(self) -> None:
            if progress is not None:
                progress(label, self.n, self.total)

        def update(self, n: int = 1) -> None:
            self.n += n
            self._report()

        def close(self) -> None:
            pass

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            self.close()

    return Bar


def file_digest(path: Path, kind: str, progress: Progress | None = None, label: str = "") -> str:
    """sha256 of the content, or the git blob id (``kind == "git"``)."""
    size = path.stat().st_size
    h = hashlib.sha256() if kind == "sha256" else hashlib.sha1(f"blob {size}\0".encode())
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(label, done, size)
    return h.hexdigest()


def download(snap: Snapshot, rf: RemoteFile, dest: Path, progress: Progress | None = None) -> Path:
    """Fetch one file of ``snap`` to ``dest``, resuming ``dest.part``, and check it against the
    published hash; ``dest`` appears only when the content is right."""
    if dest.is_file():
        return dest
    if offline():
        raise _offline_error(snap.repo)
    if rf.sha256 is None and rf.blob_id is None:
        raise HubError(f"{snap.repo}: the Hub publishes no hash for {rf.name}, so it cannot be checked; not using it")
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(snap.repo, rf.name, revision=snap.commit)
    meta = _catching(snap.repo, snap.commit, lambda: get_hf_file_metadata(url))
    if meta.commit_hash and meta.commit_hash != snap.commit:
        raise HubError(f"{snap.repo}: {rf.name} was served from commit {meta.commit_hash}, not {snap.commit}")
    if rf.sha256 is not None and meta.etag and len(meta.etag) == 64 and meta.etag != rf.sha256:
        raise HubError(f"{snap.repo}: {rf.name} is announced with sha256 {meta.etag}, the file list says {rf.sha256}")
    size = meta.size if meta.size is not None else rf.size
    headers = build_hf_headers()
    location = meta.location or url
    if urlsplit(location).netloc != urlsplit(url).netloc:
        headers.pop("authorization", None)  # a signed storage URL: the token is for the Hub only
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.is_file() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    label = f"{snap.repo}: {rf.name}"

    def get() -> None:
        with open(part, "ab") as f:
            http_get(
                location, f, resume_size=have, headers=headers, expected_size=size, tqdm_class=_bar(progress, label)
            )

    _catching(snap.repo, snap.commit, get)
    kind, want = ("sha256", rf.sha256) if rf.sha256 is not None else ("git", rf.blob_id)
    got = file_digest(part, kind, progress, f"checking {rf.name}")
    if got != want:
        part.unlink(missing_ok=True)
        what = "sha256" if kind == "sha256" else "git blob id"
        raise HubError(
            f"{snap.repo}: {rf.name} does not match its published {what} (got {got}, expected {want}); "
            "refused and deleted, nothing installed"
        )
    os.replace(part, dest)
    return dest
