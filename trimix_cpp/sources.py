"""Where each role's GGUF file comes from, in a form ``trimix models pull`` reads.

A profile's ``[sources]`` table gives, for each role, either a sentence for people (the old form,
still read: it only appears in the message when a file is missing) or a table::

    [sources.small_cpt]                 # a checkpoint, converted (and quantized) here
    repo = "pkupie/Qwen2.5-1.5B-bo-cpt"
    revision = "main"                   # a branch, a tag or a commit id; the lock file pins the commit
    type = "Q8_0"                       # the GGUF type to produce

    [sources.large_ins]                 # a repository that publishes GGUF files
    repo = "Qwen/Qwen2.5-7B-Instruct-GGUF"
    revision = "main"
    gguf = "qwen2.5-7b-instruct-q4_k_m*.gguf"   # the file, or the parts of a split GGUF file

A profile can come from any folder in ``$TRIMIX_PROFILES`` and its values become URLs and file
names, so each one is checked here before anything is fetched: the repository id is ``owner/name``
of plain characters, the revision has no spaces, slashes at its ends or ``..``, the type is one
llama.cpp names, and the pattern names ``.gguf`` files.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import TrimixError

# Bits per weight of each GGUF type, as llama.cpp's quantizer reports them for 7B llama-like
# models; the pull uses them only to estimate the result's size before converting. The keys are
# also the types a profile may name.
BITS_PER_WEIGHT: dict[str, float] = {
    "F32": 32.0,
    "F16": 16.0,
    "BF16": 16.0,
    "Q8_0": 8.5,
    "Q6_K": 6.56,
    "Q5_K_M": 5.69,
    "Q5_K_S": 5.54,
    "Q5_1": 6.0,
    "Q5_0": 5.5,
    "Q4_K_M": 4.85,
    "Q4_K_S": 4.58,
    "Q4_1": 5.0,
    "Q4_0": 4.5,
    "Q3_K_L": 4.27,
    "Q3_K_M": 3.91,
    "Q3_K_S": 3.5,
    "Q2_K": 3.35,
}

# owner/name as the Hub spells repository ids: letters, digits, "-", "_", "." (never "..").
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
REVISION = re.compile(r"[\w.\-/]{1,200}")
# llama.cpp's name for the parts of a split GGUF file: PREFIX-00001-of-00003.gguf
SPLIT_PART = re.compile(r"(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf")


@dataclass(frozen=True)
class Source:
    """One role's origin: a Hub repository at a revision, and either the GGUF type to convert its
    checkpoint to or the pattern of the GGUF file(s) it publishes."""

    repo: str
    revision: str = "main"
    type: str | None = None
    gguf: str | None = None

    @property
    def kind(self) -> str:
        return "gguf" if self.gguf is not None else "checkpoint"

    def describe(self) -> str:
        what = f"the GGUF file {self.gguf}" if self.gguf is not None else f"converted to {self.type}"
        return f"{self.repo} (revision {self.revision}), {what}"

    def matches(self, filename: str) -> bool:
        """Whether a repository file is one this source fetches (GGUF sources only)."""
        assert self.gguf is not None
        return fnmatch.fnmatchcase(filename, self.gguf)


def normalize_type(value: str) -> str:
    """A GGUF type as llama.cpp spells it (``q4_k_m`` -> ``Q4_K_M``), or one line naming the choices."""
    t = value.strip().upper()
    if t not in BITS_PER_WEIGHT:
        raise TrimixError(f"unknown GGUF type {value!r} (choose one of {', '.join(BITS_PER_WEIGHT)})")
    return t


def check_revision(rev: str, where: str) -> str:
    if not REVISION.fullmatch(rev) or ".." in rev or rev.startswith("/") or rev.endswith("/"):
        raise TrimixError(f"{where}: revision must be a branch, tag or commit id, got {rev!r}")
    return rev


def parse_source(role: str, value: Mapping[str, object], path: Path) -> Source:
    """One ``[sources.ROLE]`` table, every value checked; errors name the file, the role and the key."""
    where = f"{path}: [sources.{role}]"
    unknown = sorted(set(value) - {"repo", "revision", "type", "gguf"})
    if unknown:
        raise TrimixError(f"{where} has an unknown key {unknown[0]!r} (keys are repo, revision, type, gguf)")
    for key in ("repo", "revision", "type", "gguf"):
        if key in value and not isinstance(value[key], str):
            raise TrimixError(f"{where} {key} must be a string, got {value[key]!r}")
    repo = value.get("repo")
    if not isinstance(repo, str) or not REPO_ID.fullmatch(repo) or ".." in repo:
        raise TrimixError(f"{where} repo must be a Hub repository id such as Qwen/Qwen2.5-1.5B, got {repo!r}")
    revision = check_revision(str(value.get("revision", "main")), where)
    type_, gguf = value.get("type"), value.get("gguf")
    if (type_ is None) == (gguf is None):
        raise TrimixError(
            f"{where} needs either type (convert the checkpoint to this GGUF type) or gguf (the file pattern "
            "of a repository that publishes GGUF files), not both and not neither"
        )
    if type_ is not None:
        try:
            type_ = normalize_type(str(type_))
        except TrimixError as e:
            raise TrimixError(f"{where} type: {e}") from None
    if gguf is not None:
        gguf = str(gguf)
        if not gguf.endswith(".gguf") or gguf.startswith("/") or ".." in gguf or "\\" in gguf:
            raise TrimixError(f"{where} gguf must be a file pattern ending in .gguf, got {gguf!r}")
    return Source(repo=repo, revision=revision, type=type_, gguf=gguf)


def read_sources(
    data: object, path: Path, roles: Mapping[str, str], lang: str
) -> tuple[dict[str, Source], dict[str, str]]:
    """The ``[sources]`` table: machine-readable origins, and a sentence per role for messages.

    A role with a table must also be under ``[models]`` (the table says how to make that file)."""
    if not isinstance(data, dict):
        return {}, {}
    origins: dict[str, Source] = {}
    hints: dict[str, str] = {}
    for role, value in data.items():
        if isinstance(value, dict):
            if role not in roles:
                raise TrimixError(f"{path}: [sources.{role}] names a role that is not under [models]")
            origins[role] = parse_source(role, value, path)
            hints[role] = f"{origins[role].describe()}, with trimix models pull --lang {lang}"
        else:
            hints[role] = str(value)
    return origins, hints


def split_parts(name: str) -> tuple[str, int] | None:
    """``(prefix, count)`` when ``name`` is the first part of a split GGUF file, else None."""
    m = SPLIT_PART.fullmatch(name)
    if m is None:
        return None
    if int(m["index"]) != 1:
        return None
    return m["prefix"], int(m["count"])


def part_name(prefix: str, index: int, count: int) -> str:
    """The file name llama.cpp looks for: part ``index`` (from 1) of ``count``."""
    return f"{prefix}-{index:05d}-of-{count:05d}.gguf"
