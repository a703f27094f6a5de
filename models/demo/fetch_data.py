"""Rebuild the demo corpora from Debian packages and CPython's own documentation.

Uyghur is a low-resource language, but Debian's desktop packages carry human translations
of their user interface into it as gettext catalogs.  Every translated Uyghur string comes
paired with its English original, which gives both running Uyghur text for continued
pretraining and a small, genuinely parallel held-out set for a translation test.

English text comes from CPython's ``pydoc_data/topics.py`` (the reference topics that
``help()`` shows) plus the English msgids of the same catalogs.

Outputs (relative to this folder):

* ``build/corpus/en_train.txt``, ``build/corpus/ug_train.txt``: training text, one
  document per line (git-ignored);
* ``data/en_heldout.txt``, ``data/ug_heldout.txt``: held-out text, one string per line;
* ``data/ug_en_heldout.jsonl``: held-out parallel records ``{"id", "en", "ug"}``;
* ``data/sources.json``: the exact package versions and per-package counts.

The split is deterministic: it depends only on a hash of each string, never on the order
in which packages or catalogs were read, so a rerun gives the same files for the same
package versions.

Run as root (``apt-get download`` needs a current package list: ``apt-get update`` is
run once unless ``--no-update`` is given).
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import re
import struct
import subprocess
import sys
import tempfile
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"
DATA = HERE / "data"

# Packages whose Uyghur catalogs were checked to be non-empty in Debian 12 (bookworm).
# Lists of bare names (places, units, languages) were left out on purpose: libgweather
# and iso-codes are mostly transliterated proper names, not running text.
PACKAGES: tuple[str, ...] = (
    # GNOME
    "evolution-common",
    "libgtk-3-common",
    "libgtk-4-common",
    "nautilus-data",
    "libglib2.0-data",
    "gnome-control-center-data",
    "brasero-common",
    "gnome-disk-utility",
    "gedit-common",
    "evolution-data-server-common",
    "gnome-settings-daemon-common",
    "orca",
    "gvfs-common",
    "epiphany-browser-data",
    "aisleriot",
    "seahorse",
    "gnome-system-tools",
    "gnome-terminal-data",
    "totem-common",
    "mutter-common",
    "libgtksourceview-5-common",
    "gnome-shell-common",
    "gnome-color-manager",
    "eog",
    "evince-common",
    "network-manager-gnome",
    "gnome-system-monitor",
    "gucharmap",
    "gnome-calculator",
    "file-roller",
    "gnome-chess",
    "libgoa-1.0-common",
    "gcr",
    "zenity-common",
    "gnome-session-common",
    "gnome-keyring",
    "cheese-common",
    "simple-scan",
    "yelp",
    "gnome-power-manager",
    "gnome-contacts",
    "gnome-screenshot",
    "gnome-bluetooth-3-common",
    "gnome-initial-setup",
    "quadrapassel",
    "gnome-mines",
    "gnome-user-share",
    "baobab",
    "gnome-desktop3-data",
    "gnome-clocks",
    "dconf-editor",
    "iagno",
    "gnome-menus",
    "gnome-font-viewer",
    # Xfce
    "thunar-data",
    "xfce4-settings",
    "xfce4-panel",
    "xfburn",
    "xfce4-terminal",
    "mousepad",
    "xfdesktop4-data",
    "xfce4-session",
    "libxfce4ui-common",
    "xfwm4",
    "ristretto",
    "parole",
    "thunar-volman",
    "xfce4-power-manager-data",
    "xfce4-appfinder",
    "libxfce4util-common",
    "tumbler-common",
    "xfce4-notifyd",
    # KDE
    "libkf5kdelibs4support-data",
    "plasma-workspace-data",
    "plasma-desktop-data",
    "libkf5khtml-data",
    "dolphin",
    "konsole",
    "kmail",
    "libkf5xmlgui-data",
    "ktorrent-data",
    "okular",
    "libkf5textwidgets-data",
    "kinfocenter",
    "gwenview",
    "libkf5wallet-data",
    "libkf5configwidgets-data",
    "libkf5newstuff-data",
    "ark",
    "kcalc",
)

HELDOUT_BUCKETS = 20  # 1 bucket in 20 (about 5 %) is held out
PARALLEL_MAX = 400  # records kept in ug_en_heldout.jsonl
ARABIC = re.compile(r"[\u0600-\u06FF\uFB50-\uFDFF\uFE70-\uFEFF]")
LETTER = re.compile(r"\w", re.UNICODE)
PLACEHOLDER = re.compile(r"%[-+ #0-9.'$]*[a-zA-Z]|%\d|~[as]|\{\w*\}|\$\{?\w+\}?|<[^>]+>")


@dataclass
class Entry:
    """One translated catalog entry: an English original and its Uyghur translation."""

    en: str
    ug: str
    source: str


@dataclass
class PackageInfo:
    """What one Debian package contributed, recorded in ``data/sources.json``."""

    name: str
    version: str
    catalogs: list[str] = field(default_factory=list)
    entries: int = 0
    ug_chars: int = 0


def read_mo(path: Path) -> Iterator[tuple[str, str]]:
    """Yield ``(msgid, msgstr)`` pairs of a compiled gettext catalog.

    The format is small enough to read directly (magic, count, two tables of
    length/offset pairs); ``gettext.GNUTranslations`` would hide the plural forms and the
    context separator we need to strip.  The header entry (empty msgid) is skipped.
    """
    raw = path.read_bytes()
    magic = struct.unpack("<I", raw[:4])[0]
    endian = "<" if magic == 0x950412DE else ">"
    if struct.unpack(endian + "I", raw[:4])[0] != 0x950412DE:
        raise ValueError(f"{path}: not a gettext catalog")
    _rev, count, orig_off, trans_off = struct.unpack(endian + "4I", raw[4:20])
    header = ""
    for i in range(count):
        olen, opos = struct.unpack(endian + "2I", raw[orig_off + 8 * i : orig_off + 8 * i + 8])
        tlen, tpos = struct.unpack(endian + "2I", raw[trans_off + 8 * i : trans_off + 8 * i + 8])
        msgid_b = raw[opos : opos + olen]
        msgstr_b = raw[tpos : tpos + tlen]
        if not msgid_b:
            header = msgstr_b.decode("utf-8", "replace")
            if "charset=" in header and "charset=utf-8" not in header.lower():
                raise ValueError(f"{path}: unexpected charset in header")
            continue
        msgid = msgid_b.decode("utf-8", "replace")
        msgstr = msgstr_b.decode("utf-8", "replace")
        if "\x04" in msgid:  # "context\x04msgid"
            msgid = msgid.split("\x04", 1)[1]
        # Plural entries hold "singular\0plural" and one msgstr per form (Uyghur has one).
        yield msgid.split("\x00", 1)[0], msgstr.split("\x00", 1)[0]


def clean(text: str) -> str:
    """Normalise a UI string into plain running text.

    Keyboard accelerators (GNOME ``_File``, KDE ``&File``, and the Uyghur habit of an
    appended ``(_F)``) are markup, not language, so they are removed; so are markup tags
    and HTML entities, and all whitespace (embedded newlines included) becomes single
    spaces so that one string fits on one line.
    """
    text = unicodedata.normalize("NFC", text)
    text = re.sub(r"\(\s*[_&]\w\s*\)", "", text)
    for mark in "_&":
        # A lone marker before a letter is an accelerator; several are real characters.
        if text.count(mark) == 1:
            text = re.sub(re.escape(mark) + r"(?=\w)(?!\w+;)", "", text)
    text = text.replace("&&", "&")
    text = html.unescape(re.sub(r"<[^>]+>", " ", text))
    return " ".join(text.split())


def split_key(text: str) -> str:
    """Key that decides the train/held-out side: letters only, case-folded.

    Strings that differ only in punctuation, accelerators or spacing fall on the same
    side, so a near-copy of a held-out string can never leak into training.
    """
    return "".join(LETTER.findall(text.casefold()))


def is_heldout(text: str) -> bool:
    """Deterministic ~5 % split by a hash of the string's letters."""
    digest = hashlib.sha256(split_key(text).encode()).digest()
    return int.from_bytes(digest[:8], "big") % HELDOUT_BUCKETS == 0


def shuffle_key(text: str) -> str:
    """A fixed pseudo-random order, so that neither files nor training windows are
    alphabetical runs of near-identical strings."""
    return hashlib.sha256(b"order:" + text.encode()).hexdigest()


def is_uyghur(text: str) -> bool:
    """True when most letters are Arabic-script (untranslated or Latin-only strings fail)."""
    letters = LETTER.findall(text)
    if len(letters) < 2:
        return False
    arabic = sum(1 for ch in letters if ARABIC.match(ch))
    return arabic >= 0.6 * len(letters)


def run(cmd: list[str], cwd: Path | None = None) -> str:
    """Run a command, fail loudly, return its standard output."""
    done = subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    return done.stdout


def pinned_versions() -> dict[str, str]:
    """Versions recorded by a previous run, tried first so a rebuild uses the same files."""
    path = DATA / "sources.json"
    if not path.exists():
        return {}
    return {p["name"]: p["version"] for p in json.loads(path.read_text())["packages"]}


def download(pkg: str, debs: Path, pinned: dict[str, str]) -> Path:
    """``apt-get download`` one package into ``debs`` (reused when already there).

    The version recorded by a previous run is tried first; Debian drops superseded
    versions from its archive, so when it is gone the current version is used instead,
    with a warning (``data/sources.json`` then records the new version).
    """
    version = pinned.get(pkg)
    if version:
        cached = debs / f"{pkg}_{version.replace(':', '%3a')}_"
        hits = sorted(debs.glob(cached.name + "*.deb"))
        if hits:
            return hits[0]
        try:
            run(["apt-get", "download", "-qq", f"{pkg}={version}"], cwd=debs)
            return sorted(debs.glob(cached.name + "*.deb"))[0]
        except subprocess.CalledProcessError:
            print(f"warning: {pkg} {version} is no longer available, using the current version")
    for old in debs.glob(f"{pkg}_*.deb"):
        old.unlink()
    run(["apt-get", "download", "-qq", pkg], cwd=debs)
    return sorted(debs.glob(f"{pkg}_*.deb"))[0]


def deb_version(deb: Path) -> str:
    """The exact version string inside a .deb's control file."""
    return run(["dpkg-deb", "-f", str(deb), "Version"]).strip()


def collect(debs: Path, pinned: dict[str, str]) -> tuple[list[Entry], list[PackageInfo]]:
    """Download and unpack every package; return the cleaned translated entries."""
    entries: list[Entry] = []
    infos: list[PackageInfo] = []
    for pkg in PACKAGES:
        deb = download(pkg, debs, pinned)
        info = PackageInfo(name=pkg, version=deb_version(deb))
        with tempfile.TemporaryDirectory(dir=BUILD) as tmp:
            run(["dpkg", "-x", str(deb), tmp])
            for mo in sorted(Path(tmp).glob("usr/share/locale/ug/LC_MESSAGES/*.mo")):
                info.catalogs.append(mo.name)
                for msgid, msgstr in read_mo(mo):
                    en, ug = clean(msgid), clean(msgstr)
                    if en and "\ufffd" not in en + ug and is_uyghur(ug):
                        entries.append(Entry(en=en, ug=ug, source=f"{pkg}:{mo.stem}"))
                        info.entries += 1
                        info.ug_chars += len(ug)
        print(f"{pkg:32s} {info.version:28s} {info.entries:6d} strings {info.ug_chars:8d} chars")
        infos.append(info)
    return entries, infos


def english_paragraphs() -> list[str]:
    """Paragraphs of CPython's pydoc topics, whitespace-normalised, in a fixed order."""
    from pydoc_data import topics

    paragraphs: list[str] = []
    for key in sorted(topics.topics):
        for para in re.split(r"\n\s*\n", topics.topics[key]):
            text = " ".join(para.split())
            if len(LETTER.findall(text)) >= 20:
                paragraphs.append(text)
    return paragraphs


def dedupe(items: list[str]) -> list[str]:
    """Unique strings in first-seen order."""
    return list(dict.fromkeys(items))


def write_lines(path: Path, lines: list[str]) -> None:
    """One string per line, UTF-8, trailing newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def parallel_candidate(entry: Entry) -> bool:
    """A held-out pair fit for a translation test: a real phrase, no format placeholders."""
    return (
        not PLACEHOLDER.search(entry.en)
        and not PLACEHOLDER.search(entry.ug)
        and 20 <= len(entry.en) <= 200
        and len(entry.en.split()) >= 3
    )


def main() -> None:
    """Fetch, clean, deduplicate, split and write the corpora."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-update", action="store_true", help="skip 'apt-get update'")
    args = parser.parse_args()

    if not args.no_update:
        run(["apt-get", "update", "-qq"])
    debs = BUILD / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    entries, infos = collect(debs, pinned_versions())

    # One entry per distinct Uyghur string; the first English original seen is kept.
    by_ug: dict[str, Entry] = {}
    for entry in entries:
        by_ug.setdefault(entry.ug, entry)
    unique = sorted(by_ug.values(), key=lambda e: shuffle_key(e.ug))
    ug_train = [e for e in unique if not is_heldout(e.ug)]
    ug_held = [e for e in unique if is_heldout(e.ug)]

    # English: held-out Uyghur entries' originals never enter English training, so the
    # translation test set stays unseen on both sides.
    held_en_keys = {split_key(e.en) for e in ug_held}
    # Topic paragraphs stay in reading order (running prose); UI strings are shuffled.
    en_texts = dedupe(english_paragraphs() + sorted({e.en for e in entries}, key=shuffle_key))
    en_train = [t for t in en_texts if not is_heldout(t) and split_key(t) not in held_en_keys]
    en_held = [t for t in en_texts if is_heldout(t) and split_key(t) not in held_en_keys]

    write_lines(BUILD / "corpus" / "en_train.txt", en_train)
    write_lines(BUILD / "corpus" / "ug_train.txt", [e.ug for e in ug_train])
    write_lines(DATA / "en_heldout.txt", en_held)
    write_lines(DATA / "ug_heldout.txt", [e.ug for e in ug_held])

    pairs = [e for e in ug_held if parallel_candidate(e)]
    pairs.sort(key=lambda e: shuffle_key(e.ug))
    with (DATA / "ug_en_heldout.jsonl").open("w", encoding="utf-8") as out:
        for i, e in enumerate(sorted(pairs[:PARALLEL_MAX], key=lambda e: e.source)):
            record = {"id": f"ug-en-{i:04d}", "en": e.en, "ug": e.ug, "source": e.source}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")

    summary = {
        "packages": [vars(i) for i in infos],
        "python": sys.version.split()[0],
        "english_source": "pydoc_data/topics.py of CPython " + sys.version.split()[0],
        "counts": {
            "catalog_entries": len(entries),
            "ug_unique": len(unique),
            "ug_train_strings": len(ug_train),
            "ug_train_chars": sum(len(e.ug) for e in ug_train),
            "ug_heldout_strings": len(ug_held),
            "ug_heldout_chars": sum(len(e.ug) for e in ug_held),
            "parallel_heldout_records": min(len(pairs), PARALLEL_MAX),
            "en_train_docs": len(en_train),
            "en_train_chars": sum(len(t) for t in en_train),
            "en_heldout_docs": len(en_held),
            "en_heldout_chars": sum(len(t) for t in en_held),
        },
    }
    (DATA / "sources.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps(summary["counts"], indent=1))


if __name__ == "__main__":
    main()
