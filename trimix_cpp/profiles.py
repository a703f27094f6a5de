"""Language profiles: ``--lang bod`` names the models, method and prompt format for a language.

A profile is a small TOML file::

    [profile]
    lang = "bod"
    name = "Tibetan"
    method = "trimix"          # default method
    select = "ppl"             # default weight selection (fixed needs alpha/beta below)
    n_ctx = 4096
    template = "{prompt}"      # how the user's text becomes the prompt
    stop = ["\\n"]
    page = "chat"              # trimix serve's page starts in chat or text continuation ("complete")
    temperature = 0.0          # trimix serve's default temperature (0: greedy)

    [models]                   # GGUF file of each role
    large_ins = "Qwen2.5-7B-Instruct-Q4_K_M.gguf"
    small_cpt = "Qwen2.5-1.5B-bo-cpt-Q8_0.gguf"
    small_base = "Qwen2.5-1.5B-Q8_0.gguf"

    [sources.small_cpt]        # where each model comes from (trimix_cpp.sources; trimix models pull)
    repo = "pkupie/Qwen2.5-1.5B-bo-cpt"
    revision = "main"
    type = "Q8_0"

``--lang CODE`` reads ``CODE.toml`` from the first of: ``$TRIMIX_PROFILES``, the user's config
folder (``$XDG_CONFIG_HOME/trimix/profiles``, default ``~/.config/trimix/profiles``), and the
profiles shipped with trimix (the repository's ``models/`` folder, installed as the ``trimix_models``
package so that a wheel carries the profiles and the demo trio's two small GGUF files). A model file
name resolves against ``$TRIMIX_MODELS``, then the user's models folder (``$XDG_DATA_HOME/trimix/models``,
default ``~/.local/share/trimix/models``, where ``trimix models pull`` and ``install`` put files),
then the profile's own folder; ``package:NAME/FILE`` names a
file inside one of the model packages trimix knows (:data:`trimix_cpp.packaged.MODEL_PACKAGES`), found
through the package's installed file list without importing it. Nothing is downloaded while a
profile is read: only ``trimix models pull`` fetches.

A profile is read from any folder in ``$TRIMIX_PROFILES``, so every field is checked before use: the
language code is a plain word (it becomes a file name), the name has no control characters (it is
printed to terminals), ``n_ctx`` is at most :data:`MAX_N_CTX`, and a ``package:`` entry names an
allowed package.
"""

from __future__ import annotations

import math
import os
import re
import sys
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelFileError, TrimixError
from .fusion import LARGE_BASE, METHODS, ROLES
from .packaged import check_package_ref, package_file
from .sources import Source, read_sources

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PACKAGE_PREFIX = "package:"
# llama.cpp takes the context length as a 32-bit count; 2^24 (16,777,216) positions is already far
# beyond any model's training context, and a larger number only fails later inside llama.cpp.
MAX_N_CTX = 2**24
# The smallest context that generates anything: one prompt token and one new token.
MIN_N_CTX = 2
# A language code becomes a file name (CODE.toml): letters, digits, "-" and "_", starting with a
# letter or digit, so it can never name another folder or a hidden file.
LANG_CODE = re.compile(r"[^\W_][\w-]{0,63}")
# Roles a profile may name although its default method does not use them, and the methods they
# enable: the large base model is loaded only by trimix4 (Eq. 1), so a setup without it is complete.
OPTIONAL_ROLES: dict[str, tuple[str, ...]] = {LARGE_BASE: ("trimix4",)}


def _shipped_dir() -> Path:
    """The installed ``trimix_models`` package (the repository's ``models/`` folder); a source tree
    used without installing has the same folder beside the library."""
    try:
        import trimix_models
    except ImportError:
        return Path(__file__).resolve().parent.parent / "models"
    return Path(trimix_models.__file__).resolve().parent


SHIPPED_DIR = _shipped_dir()

# How trimix serve's chat page starts: a conversation through the chat template, or text continued as is.
PAGE_MODES = ("chat", "complete")


def user_profiles_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "trimix" / "profiles"


def search_dirs() -> list[Path]:
    """Folders searched for ``CODE.toml``, first match wins."""
    dirs = []
    env = os.environ.get("TRIMIX_PROFILES")
    if env:
        dirs += [Path(p) for p in env.split(os.pathsep) if p]
    return [*dirs, user_profiles_dir(), SHIPPED_DIR]


def data_models_dir() -> Path:
    """The user's models folder under the XDG data folder."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "trimix" / "models"


def model_dirs() -> list[Path]:
    """Folders a model file name is looked up in, before the profile's own folder."""
    env = os.environ.get("TRIMIX_MODELS")
    dirs = [Path(p) for p in env.split(os.pathsep) if p] if env else []
    return [*dirs, data_models_dir()]


def install_dir() -> Path:
    """Where pulled and installed files go: the first ``$TRIMIX_MODELS`` folder, else the XDG one."""
    return model_dirs()[0]


@dataclass
class Profile:
    lang: str
    name: str
    path: Path
    models: dict[str, str]
    method: str = "trimix"
    select: str = "ppl"
    alpha: float | None = None
    beta: float | None = None
    n_ctx: int = 4096
    template: str = "{prompt}"
    stop: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)
    origins: dict[str, Source] = field(default_factory=dict)
    page: str | None = None  # the chat page's starting mode: "chat" or "complete" (None: chat when possible)
    temperature: float | None = None  # trimix serve's default temperature (None: greedy)

    def format_prompt(self, text: str) -> str:
        return self.template.replace("{prompt}", text)

    def locate(self, role: str) -> Path:
        """The file of ``role``, or one line naming it, where it was looked for, and how to get it."""
        if role not in self.models:
            raise TrimixError(f"profile {self.lang} ({self.path}) names no {role} model (add it under [models])")
        return resolve_model(self.models[role], self.path.parent, self, role)

    def candidates(self, role: str) -> list[Path]:
        return _candidates(self.models[role], self.path.parent)

    def paths(self, roles: tuple[str, ...] | None = None) -> dict[str, Path]:
        return {r: self.locate(r) for r in (roles or tuple(self.models))}

    def is_optional(self, role: str) -> bool:
        """Whether the profile's default method runs without ``role`` (see :data:`OPTIONAL_ROLES`)."""
        return role in OPTIONAL_ROLES and self.method not in OPTIONAL_ROLES[role]

    def required_roles(self) -> tuple[str, ...]:
        return tuple(r for r in self.models if not self.is_optional(r))

    def present(self, role: str) -> bool:
        try:
            self.locate(role)
            return True
        except TrimixError:
            return False


def _package_ref(ref: str) -> tuple[str, str]:
    package, _, name = ref[len(PACKAGE_PREFIX) :].partition("/")
    return package, name


def _candidates(ref: str, profile_dir: Path) -> list[Path]:
    if ref.startswith(PACKAGE_PREFIX):
        try:
            return [package_file(*_package_ref(ref))]
        except ModelFileError:
            return []
    p = Path(ref).expanduser()
    if p.is_absolute():
        return [p]
    return [d / p for d in model_dirs()] + [profile_dir / p]


def resolve_model(ref: str, profile_dir: Path, profile: Profile | None = None, role: str = "") -> Path:
    if ref.startswith(PACKAGE_PREFIX):
        return package_file(*_package_ref(ref))
    for cand in _candidates(ref, profile_dir):
        if cand.is_file():
            return cand
    where = ", ".join(str(c.parent) for c in _candidates(ref, profile_dir))
    how = ""
    if profile is not None and role in profile.sources:
        how = f"; get it from {profile.sources[role]}"
    elif profile is not None:
        how = "; put the file there or set $TRIMIX_MODELS"
    lang = f" for --lang {profile.lang}" if profile else ""
    raise ModelFileError(f"{role or 'model'} file{lang} not found: {Path(ref).name} (looked in {where}){how}")


def _field(data: Mapping[str, object], key: str, kind: type | tuple[type, ...], path: Path, default=None):
    value = data.get(key, default)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        what = "number" if isinstance(kind, tuple) else {"str": "string", "int": "whole number"}[kind.__name__]
        raise TrimixError(f"{path}: [profile] {key} must be a {what}, got {value!r}")
    return value


def load_profile(path: Path) -> Profile:
    """Read and validate one profile file; any problem is one line naming the file and the key."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise TrimixError(f"{path} is not UTF-8 text (save it as UTF-8)") from None
    except IsADirectoryError:
        raise TrimixError(f"{path} is a folder, not a profile file (rename it, or move it out of the way)") from None
    except OSError as e:
        raise TrimixError(f"cannot read {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise TrimixError(f"{path} is not valid TOML: {e}") from None
    prof = data.get("profile", {})
    models = data.get("models", {})
    if not isinstance(prof, dict) or not isinstance(models, dict):
        raise TrimixError(f"{path}: [profile] and [models] must be tables")
    bad_roles = [r for r in models if r not in ROLES]
    if bad_roles:
        raise TrimixError(f"{path}: unknown role {bad_roles[0]!r} under [models] (roles are {', '.join(ROLES)})")
    if not all(isinstance(v, str) and v for v in models.values()):
        raise TrimixError(f"{path}: every [models] entry must be a file name")
    for role, ref in models.items():
        if ref.startswith(PACKAGE_PREFIX):
            try:
                check_package_ref(*_package_ref(ref))
            except TrimixError as e:
                raise TrimixError(f"{path}: [models] {role} = {ref!r}: {e}") from None
    method = _field(prof, "method", str, path, "trimix")
    if method not in METHODS:
        raise TrimixError(f"{path}: unknown method {method!r} (choose one of {', '.join(METHODS)})")
    select = _field(prof, "select", str, path, "ppl")
    if select not in ("fixed", "ppl", "ent"):
        raise TrimixError(f"{path}: select must be fixed, ppl or ent, got {select!r}")
    alpha = _field(prof, "alpha", (int, float), path)
    beta = _field(prof, "beta", (int, float), path)
    for key, v in (("alpha", alpha), ("beta", beta)):
        if v is not None and not math.isfinite(float(v)):
            raise TrimixError(f"{path}: {key} must be a finite number")
    n_ctx = check_n_ctx(_field(prof, "n_ctx", int, path, 4096), f"{path}: n_ctx")
    template = _field(prof, "template", str, path, "{prompt}")
    if "{prompt}" not in template:
        raise TrimixError(f"{path}: template must contain {{prompt}}")
    stop = prof.get("stop", [])
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise TrimixError(f"{path}: stop must be a list of strings")
    page = _field(prof, "page", str, path)
    if page is not None and page not in PAGE_MODES:
        raise TrimixError(f"{path}: page must be {' or '.join(PAGE_MODES)}, got {page!r}")
    temperature = _field(prof, "temperature", (int, float), path)
    if temperature is not None and not (math.isfinite(float(temperature)) and temperature >= 0):
        raise TrimixError(f"{path}: temperature must be a finite number >= 0 (0 is greedy)")
    lang = check_lang(_field(prof, "lang", str, path, path.stem), f"{path}: lang")
    origins, sources = read_sources(data.get("sources", {}), path, models, lang)
    return Profile(
        lang=lang,
        name=check_name(_field(prof, "name", str, path, lang), f"{path}: name"),
        path=path,
        models=dict(models),
        method=method,
        select=select,
        alpha=None if alpha is None else float(alpha),
        beta=None if beta is None else float(beta),
        n_ctx=n_ctx,
        template=template,
        stop=list(stop),
        sources=sources,
        origins=origins,
        page=page,
        temperature=None if temperature is None else float(temperature),
    )


def find_profile(lang: str) -> Profile:
    """The profile for ``--lang``, from the first folder that has ``LANG.toml``."""
    check_lang(lang, "lang")
    dirs = search_dirs()
    for d in dirs:
        cand = d / f"{lang}.toml"
        if cand.is_file():
            return load_profile(cand)
    known = sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.toml") if p.is_file()})
    raise TrimixError(
        "no profile for {lang} {given} (looked for {given}.toml in {dirs}); "
        "known: {known}; add one with trimix models add",
        param="lang",
        given=lang,
        dirs=", ".join(map(str, dirs)),
        known=", ".join(known) or "none",
    )


def profile_files(lang: str) -> list[Path]:
    """The model files of ``--lang``'s profile: every required one (one line naming a missing one)
    and the optional ones that are present."""
    profile = find_profile(lang)
    return [profile.locate(r) for r in profile.models if not profile.is_optional(r) or profile.present(r)]


def all_profiles() -> tuple[list[Profile], list[str]]:
    """Every profile found, the first of each language code winning as ``--lang`` would, and a
    one-line error for each file that does not read as a profile."""
    seen: dict[str, Profile] = {}
    errors: list[str] = []
    for d in search_dirs():
        if not d.is_dir():
            continue
        for p in sorted(d.glob("*.toml")):
            if p.stem in seen:
                continue
            try:
                seen[p.stem] = load_profile(p)
            except TrimixError as e:
                errors.append(str(e))
    return list(seen.values()), errors


def _bad(where: str, problem: str, got: object) -> TrimixError:
    """``where`` is the parameter (``lang``) or, for a value read from a file, where it was read."""
    param = where if where.isidentifier() else None
    return TrimixError(("{param} " if param else "{where} ") + problem, param=param, where=where, got=got)


def check_lang(lang: str, where: str) -> str:
    """A language code, which becomes the profile's file name ``CODE.toml``."""
    if not isinstance(lang, str) or not LANG_CODE.fullmatch(lang):
        raise _bad(
            where, "takes a language code such as bod or uig (letters, digits, - and _, at most 64), got {got!r}", lang
        )
    return lang


def check_name(name: str, where: str) -> str:
    """A language name for listings: one line of printable text (control characters could rewrite the
    terminal that lists it, and a lone surrogate cannot be saved as UTF-8)."""
    bad = next((c for c in name if unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp")), None)
    if bad is not None:
        raise _bad(where, "must be one line of text without control characters, got {got!r}", name)
    if not name.strip() or len(name) > 200:
        raise _bad(where, "must be 1 to 200 characters of text, got {got!r}", name)
    return name


def check_n_ctx(n_ctx: int, where: str) -> int:
    """A context length llama.cpp can take (it counts positions in 32 bits)."""
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or not MIN_N_CTX <= n_ctx <= MAX_N_CTX:
        raise _bad(
            where,
            f"must be a whole number from {MIN_N_CTX} (a prompt token and a generated one) to "
            f"{MAX_N_CTX:,} (2^24, beyond any model's training context; llama.cpp takes a 32-bit count), "
            "got {got!r}",
            n_ctx,
        )
    return n_ctx


def check_new_profile(lang: str, name: str | None, n_ctx: int) -> None:
    """Everything about a profile to write that can be checked before its models are loaded."""
    check_lang(lang, "lang")
    if name is not None:
        check_name(name, "name")
    check_n_ctx(n_ctx, "n_ctx")


def toml_string(s: str) -> str:
    """``s`` as a TOML basic string: quotes, backslashes and control characters escaped, so any text
    reads back exactly."""
    out = []
    for c in s:
        if c in ('"', "\\"):
            out.append("\\" + c)
        elif unicodedata.category(c) == "Cc" and c != "\t":
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def write_profile(
    path: Path, lang: str, models: Mapping[str, Path], name: str | None = None, n_ctx: int = 4096
) -> None:
    """Write a user profile with absolute model paths (TOML written by hand: it is a few lines). The
    values are checked first, with the rules :func:`load_profile` applies, so that what is written
    always reads back."""
    check_new_profile(lang, name, n_ctx)
    files = {}
    for role, p in models.items():
        if role not in ROLES:
            raise TrimixError(f"unknown role {role!r} (roles are {', '.join(ROLES)})")
        resolved = str(Path(p).resolve())
        try:
            resolved.encode("utf-8")
        except UnicodeEncodeError:
            raise TrimixError(f"the path of the {role} model is not UTF-8 ({resolved!r}); rename the file") from None
        files[role] = resolved
    lines = [
        "[profile]",
        f"lang = {toml_string(lang)}",
        f"name = {toml_string(name or lang)}",
        'method = "trimix"',
        'select = "ppl"',
        f"n_ctx = {n_ctx}",
        "",
        "[models]",
        *(f"{r} = {toml_string(p)}" for r, p in files.items()),
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(path)
