"""Loading the models of a run, one per role, and the vocabulary they share.

Each model gets one llama.cpp context whose KV cache holds several sequences (``n_seq``), so one
prompt evaluation can serve every method that continues it, and several generations or users can
decode side by side, each in a cache of its own (or, for evaluation, all in one shared cache).
Models loaded from the same file are loaded once per role (each role needs its own context) but
their vocabularies are read once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import _llama
from .errors import TrimixError, WeightError
from .fusion import ROLES
from .vocab import ATTR_CONTROL, SharedVocab, check_same_vocabulary, padding_mask

_USER_DEFINED = 1 << 4


@dataclass
class LoadOptions:
    """How llama.cpp loads each model.

    ``n_ctx`` bounds one sequence (prompt plus generation); ``n_seq`` is how many sequences decode
    together (``--parallel``). ``isolated`` (the default) gives every sequence a KV cache of its own,
    so that sequences decoding together never change each other's logits (see
    :class:`~trimix_cpp._llama.LlamaModel`); with ``isolated=False`` every sequence shares one cache
    of ``kv_cells`` cells (by default room for ``n_seq`` full sequences), where a prompt is shared
    without copying. ``n_gpu_layers=-1`` puts every layer on the GPU when the build has a GPU
    backend and none otherwise.
    """

    n_ctx: int = 4096
    n_batch: int = 512
    n_threads: int | None = None
    n_gpu_layers: int = -1
    verbose: bool = False
    n_seq: int = 1
    kv_cells: int | None = None
    isolated: bool = True

    def __post_init__(self) -> None:
        """Refuse, before anything loads (a server has not yet said "listening"), a context or a
        sequence count llama.cpp would abort on, and a cache size the layout would ignore."""
        _llama.check_load_numbers(n_ctx=self.n_ctx, n_batch=self.n_batch, n_threads=self.n_threads)
        check_parallel(self.n_seq)
        if self.isolated and self.kv_cells is not None:
            raise TrimixError(
                f"kv_cells={self.kv_cells} sizes one cache shared by every sequence, but isolated=True gives each "
                "sequence its own n_ctx cells (pass isolated=False with kv_cells, or leave kv_cells out)"
            )

    def cells(self) -> int:
        return self.kv_cells if self.kv_cells is not None else self.n_ctx * self.n_seq


# An engine keeps one sequence of its own for scoring besides the ``n_seq`` it generates on.
SCORING_SEQS = 1


def check_parallel(n_seq: object) -> None:
    """``--parallel``: 1 up to llama.cpp's sequence limit less the engine's own scoring sequence."""
    top = _llama.MAX_SEQ - SCORING_SEQS
    if isinstance(n_seq, bool) or not isinstance(n_seq, int) or not 1 <= n_seq <= top:
        raise TrimixError(
            "{n_seq} must be a whole number from 1 to {top} (llama.cpp holds {held} sequences and "
            "trimix keeps one for scoring), got {got!r}",
            param="n_seq",
            top=top,
            held=_llama.MAX_SEQ,
            got=n_seq,
        )


def _vocab_of(model: _llama.LlamaModel) -> tuple[list[bytes], np.ndarray]:
    """Special-rendered pieces and attribute flags of one model (one ctypes pass over its ids)."""
    return model.token_pieces(special=True), model.token_attrs()


def build_shared_vocab(names: Sequence[str], models: Sequence[_llama.LlamaModel]) -> SharedVocab:
    """Check that ``models`` can be fused and describe the vocabulary they share.

    Models loaded from the same file are read once.
    """
    cache: dict[Path, tuple[list[bytes], np.ndarray]] = {}
    specials, attrs = [], []
    for m in models:
        key = m.path.resolve()
        if key not in cache:
            cache[key] = _vocab_of(m)
        specials.append(cache[key][0])
        attrs.append(cache[key][1])
    n = check_same_vocabulary(names, specials)
    ref_pieces, ref_attrs = specials[0], attrs[0][:n]
    # Text bytes: control tokens add nothing to the generated text (llama.cpp renders them only
    # when asked for special tokens).
    control = (ref_attrs & ATTR_CONTROL) != 0
    pieces = [b"" if c else p for p, c in zip(ref_pieces[:n], control.tolist())]
    eog = np.zeros(n, dtype=bool)
    marked = np.flatnonzero((ref_attrs & (ATTR_CONTROL | _USER_DEFINED)) != 0)
    for tok in marked.tolist():
        eog[tok] = models[0].is_eog(tok)
    banned = padding_mask(n, specials, attrs)
    texts = {ref_pieces[t].decode("utf-8", "replace"): t for t in marked.tolist() if ref_pieces[t]}
    return SharedVocab(n_vocab=n, pieces=pieces, banned=banned, eog=eog, specials=texts)


def load_models(
    paths: Mapping[str, str | Path], options: LoadOptions, extra_seqs: int = 0
) -> tuple[dict[str, _llama.LlamaModel], SharedVocab]:
    """Every role's model (in canonical role order) and their shared vocabulary.

    Files are checked before any is loaded, so a bad path fails before minutes of loading.
    ``extra_seqs`` sequences beyond ``options.n_seq`` are reserved for the engine's own scoring.
    """
    unknown = [r for r in paths if r not in ROLES]
    if unknown:
        raise WeightError(f"unknown role {unknown[0]!r} (roles are {', '.join(ROLES)})")
    if not paths:
        raise TrimixError("no model given (pass {large_ins}/{small_cpt}/{small_base} or {lang})", param="lang")
    _llama.set_verbose(options.verbose)
    if extra_seqs:
        check_parallel(options.n_seq)
    ordered = [r for r in ROLES if r in paths]
    for r in ordered:
        _llama.check_gguf_file(Path(paths[r]))
    models: dict[str, _llama.LlamaModel] = {}
    try:
        for r in ordered:
            models[r] = _llama.LlamaModel(
                paths[r],
                n_ctx=options.n_ctx,
                n_batch=options.n_batch,
                n_seq=options.n_seq + extra_seqs,
                kv_cells=None if options.isolated else options.cells(),
                n_threads=options.n_threads,
                n_gpu_layers=options.n_gpu_layers,
                isolated=options.isolated,
            )
        names = [f"{r} ({models[r].path.name})" for r in ordered]
        vocab = build_shared_vocab(names, [models[r] for r in ordered])
    except BaseException:
        for m in models.values():
            m.close()
        raise
    return models, vocab
