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

    [models]                   # GGUF file of each role
    large_ins = "Qwen2.5-7B-Instruct-Q4_K_M.gguf"
    small_cpt = "Qwen2.5-1.5B-bo-cpt-Q8_0.gguf"
    small_base = "Qwen2.5-1.5B-Q8_0.gguf"

    [sources]                  # where each model comes from, for the message when a file is missing
    small_cpt = "pkupie/Qwen2.5-1.5B-bo-cpt (convert as models/README.md explains)"

``--lang CODE`` reads ``CODE.toml`` from the first of: ``$TRIMIX_PROFILES``, the user's config
folder (``$XDG_CONFIG_HOME/trimix/profiles``, default ``~/.config/trimix/profiles``), and the
``models/`` folder shipped with trimix. A model file name resolves against ``$TRIMIX_MODELS``, then
the profile's own folder; ``package:NAME/FILE`` names a file inside an installed Python package.
Nothing is ever downloaded.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelFileError, TrimixError
from .fusion import METHODS, ROLES
from .packaged import package_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "models"
PACKAGE_PREFIX = "package:"


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


def model_dirs() -> list[Path]:
    env = os.environ.get("TRIMIX_MODELS")
    return [Path(p) for p in env.split(os.pathsep) if p] if env else []


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


def _candidates(ref: str, profile_dir: Path) -> list[Path]:
    if ref.startswith(PACKAGE_PREFIX):
        package, _, name = ref[len(PACKAGE_PREFIX) :].partition("/")
        return [package_dir(package) / name]
    p = Path(ref).expanduser()
    if p.is_absolute():
        return [p]
    return [d / p for d in model_dirs()] + [profile_dir / p]


def resolve_model(ref: str, profile_dir: Path, profile: Profile | None = None, role: str = "") -> Path:
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
    n_ctx = _field(prof, "n_ctx", int, path, 4096)
    if n_ctx <= 0:
        raise TrimixError(f"{path}: n_ctx must be positive")
    template = _field(prof, "template", str, path, "{prompt}")
    if "{prompt}" not in template:
        raise TrimixError(f"{path}: template must contain {{prompt}}")
    stop = prof.get("stop", [])
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise TrimixError(f"{path}: stop must be a list of strings")
    sources = data.get("sources", {})
    return Profile(
        lang=_field(prof, "lang", str, path, path.stem),
        name=_field(prof, "name", str, path, path.stem),
        path=path,
        models=dict(models),
        method=method,
        select=select,
        alpha=None if alpha is None else float(alpha),
        beta=None if beta is None else float(beta),
        n_ctx=n_ctx,
        template=template,
        stop=list(stop),
        sources={k: str(v) for k, v in sources.items()} if isinstance(sources, dict) else {},
    )


def find_profile(lang: str) -> Profile:
    """The profile for ``--lang``, from the first folder that has ``LANG.toml``."""
    if not lang or "/" in lang or lang.startswith("."):
        raise TrimixError(f"--lang takes a language code such as bod or uig, got {lang!r}")
    dirs = search_dirs()
    for d in dirs:
        cand = d / f"{lang}.toml"
        if cand.is_file():
            return load_profile(cand)
    known = sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.toml")})
    raise TrimixError(
        f"no profile for --lang {lang} (looked for {lang}.toml in {', '.join(map(str, dirs))}); "
        f"known: {', '.join(known) or 'none'}; add one with trimix models add"
    )


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


def write_profile(
    path: Path, lang: str, models: Mapping[str, Path], name: str | None = None, n_ctx: int = 4096
) -> None:
    """Write a user profile with absolute model paths (TOML written by hand: it is five lines)."""

    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [
        "[profile]",
        f"lang = {q(lang)}",
        f"name = {q(name or lang)}",
        'method = "trimix"',
        'select = "ppl"',
        f"n_ctx = {int(n_ctx)}",
        "",
        "[models]",
        *(f"{r} = {q(str(Path(p).resolve()))}" for r, p in models.items()),
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(path)
