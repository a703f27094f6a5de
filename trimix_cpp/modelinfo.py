"""What a GGUF file is, read without loading its weights, and whether several files can be fused.

llama.cpp loads only the vocabulary and metadata (``vocab_only``), which takes a fraction of a second
even for a large model, so ``trimix inspect`` can answer before anyone waits for weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf

from . import _llama
from .engine import build_shared_vocab
from .errors import TrimixError

_VOCAB_TYPES = {"llama": "SentencePiece (SPM)", "gpt2": "byte-level BPE", "bert": "WordPiece", "t5": "Unigram"}


@dataclass
class ModelInfo:
    path: str
    name: str
    architecture: str
    vocab_size: int
    vocab_type: str
    quantization: str
    context_length: int
    file_size_bytes: int
    add_bos: bool

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _quant_name(file_type: str | None) -> str:
    if file_type is None:
        return "unknown"
    try:
        return gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"file_type {file_type}"


def model_info(model: _llama.LlamaModel) -> ModelInfo:
    arch = model.meta("general.architecture") or "unknown"
    tok_model = model.meta("tokenizer.ggml.model") or "unknown"
    return ModelInfo(
        path=str(model.path),
        name=model.meta("general.name") or model.path.stem,
        architecture=arch,
        vocab_size=model.n_vocab,
        vocab_type=_VOCAB_TYPES.get(tok_model, tok_model),
        quantization=_quant_name(model.meta("general.file_type")),
        context_length=model.n_ctx_train,
        file_size_bytes=model.path.stat().st_size,
        add_bos=model.add_bos,
    )


@dataclass
class FusionCheck:
    models: list[ModelInfo]
    fusable: bool
    shared_vocab: int
    reason: str


def inspect_models(paths: Sequence[str | Path]) -> FusionCheck:
    """Describe each file and say whether they can all be fused (one shared vocabulary)."""
    if not paths:
        raise TrimixError("no model given (pass one or more .gguf paths)")
    models = [_llama.LlamaModel(p, vocab_only=True) for p in paths]
    try:
        infos = [model_info(m) for m in models]
        try:
            shared = build_shared_vocab([m.path.name for m in models], models)
        except TrimixError as err:
            return FusionCheck(infos, False, 0, str(err))
        sizes = {m.n_vocab for m in models}
        if len(sizes) > 1:
            reason = f"padded vocabularies: fused over the {shared.n_vocab} ids all models share"
        else:
            reason = "same vocabulary" if len(models) > 1 else "single model"
        return FusionCheck(infos, True, shared.n_vocab, reason)
    finally:
        for m in models:
            m.close()
