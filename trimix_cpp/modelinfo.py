"""What a GGUF file is, read without loading its weights, and whether several files can be fused.

llama.cpp loads only the vocabulary and metadata (``vocab_only``), which takes a fraction of a second
even for a large model, so ``trimix inspect`` can answer before anyone waits for weights. Every file's
header is checked first (:mod:`.gguf_check`): a file llama.cpp would crash on, or refuse once the
weights load, is reported as the error it is rather than described as fusable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf

from . import _llama
from .engine import build_shared_vocab
from .errors import TrimixError
from .gguf_check import check_gguf

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
    kv_bytes_per_token: int = 0

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
        context_length=_meta_int(model, f"{arch}.context_length"),
        file_size_bytes=model.path.stat().st_size,
        add_bos=model.add_bos,
        kv_bytes_per_token=kv_cache_bytes(model, 1),
    )


def _meta_int(model: _llama.LlamaModel, key: str, default: int = 0) -> int:
    value = model.meta(key)
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def kv_cache_bytes(model: _llama.LlamaModel, n_ctx: int, bytes_per_value: int = 2) -> int:
    """Keys and values of every layer for ``n_ctx`` positions, in llama.cpp's default F16 cache."""
    arch = model.meta("general.architecture") or ""
    n_layer = _meta_int(model, f"{arch}.block_count")
    n_embd = _meta_int(model, f"{arch}.embedding_length")
    n_head = max(_meta_int(model, f"{arch}.attention.head_count", 1), 1)
    n_head_kv = _meta_int(model, f"{arch}.attention.head_count_kv", n_head)
    k_len = _meta_int(model, f"{arch}.attention.key_length", n_embd // n_head)
    v_len = _meta_int(model, f"{arch}.attention.value_length", n_embd // n_head)
    return n_layer * n_ctx * n_head_kv * (k_len + v_len) * bytes_per_value


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
    for p in paths:
        _llama.check_gguf_file(Path(p))  # missing, not a file, not GGUF
        check_gguf(p)  # the header, tensors included, although only the vocabulary loads here
    models: list[_llama.LlamaModel] = []
    try:
        for p in paths:
            models.append(_llama.LlamaModel(p, vocab_only=True))
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
