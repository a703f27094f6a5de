"""Loading a set of models by role, evaluating a prompt once, and streaming fused generation.

The loop reads top to bottom like the algorithm: evaluate the prompt in every model, then per step
fuse the last logits of every model, mask what would break UTF-8, pick a token, turn its bytes into
whole characters, and feed the token back to every model. Generation is a generator of text
pieces; what it measured is on the :class:`Generation` object once it is exhausted.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import _llama
from .errors import ContextOverflowError, TrimixError, WeightError
from .fusion import LARGE_INS, ROLES, Fuser, FusionPlan
from .sampling import SamplingParams, make_sampler
from .utf8 import StreamDecoder, Utf8Guard
from .vocab import ATTR_CONTROL, SharedVocab, check_same_vocabulary, padding_mask

_USER_DEFINED = 1 << 4


@dataclass
class LoadOptions:
    """How llama.cpp loads each model. ``n_gpu_layers=-1`` puts every layer on the GPU when the
    build has a GPU backend and none otherwise."""

    n_ctx: int = 4096
    n_batch: int = 512
    n_threads: int | None = None
    n_gpu_layers: int = -1
    verbose: bool = False


@dataclass
class Timings:
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    gen_tokens: int = 0
    gen_s: float = 0.0
    decode_s: float = 0.0  # time inside llama_decode during generation, all models together

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prompt_s if self.prompt_s > 0 else 0.0

    @property
    def gen_tokens_per_s(self) -> float:
        return self.gen_tokens / self.gen_s if self.gen_s > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "prompt_s": round(self.prompt_s, 6),
            "prompt_tokens_per_s": round(self.prompt_tokens_per_s, 3),
            "gen_tokens": self.gen_tokens,
            "gen_s": round(self.gen_s, 6),
            "gen_tokens_per_s": round(self.gen_tokens_per_s, 3),
            "decode_s": round(self.decode_s, 6),
        }


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
    for tok in np.flatnonzero((ref_attrs & (ATTR_CONTROL | _USER_DEFINED)) != 0):
        eog[tok] = models[0].is_eog(int(tok))
    banned = padding_mask(n, specials, attrs)
    return SharedVocab(n_vocab=n, pieces=pieces, banned=banned, eog=eog)


class Engine:
    """A set of models, one per role, that share a vocabulary; the context manager frees them."""

    def __init__(self, paths: Mapping[str, str | Path], options: LoadOptions | None = None) -> None:
        self.options = options or LoadOptions()
        unknown = [r for r in paths if r not in ROLES]
        if unknown:
            raise WeightError(f"unknown role {unknown[0]!r} (roles are {', '.join(ROLES)})")
        if not paths:
            raise TrimixError("no model given (pass --large-ins/--small-cpt/--small-base or --lang)")
        _llama.set_verbose(self.options.verbose)
        ordered = [r for r in ROLES if r in paths]
        for r in ordered:  # fail on a bad path before spending time loading the others
            _llama.check_gguf_file(Path(paths[r]))
        self.models: dict[str, _llama.LlamaModel] = {}
        try:
            for r in ordered:
                o = self.options
                self.models[r] = _llama.LlamaModel(
                    paths[r], n_ctx=o.n_ctx, n_batch=o.n_batch, n_threads=o.n_threads, n_gpu_layers=o.n_gpu_layers
                )
            names = [f"{r} ({self.models[r].path.name})" for r in ordered]
            self.vocab = build_shared_vocab(names, [self.models[r] for r in ordered])
        except BaseException:
            self.close()
            raise
        # The prompt is tokenized once, by the large instruction model when there is one: its
        # metadata decides whether a BOS token goes first, and the same ids go to every model.
        self.reference_role = LARGE_INS if LARGE_INS in self.models else ordered[0]
        self.n_ctx = min(m.n_ctx for m in self.models.values())
        self._guards: dict[bool, Utf8Guard] = {}

    # -- lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        for m in getattr(self, "models", {}).values():
            m.close()
        self.models = {}

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- prompt -----------------------------------------------------------------------------------

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.models)

    def tokenize(self, prompt: str) -> np.ndarray:
        ref = self.models[self.reference_role]
        return ref.tokenize(prompt, add_bos=ref.add_bos)

    def check_prompt(self, tokens: np.ndarray) -> None:
        if len(tokens) == 0:
            raise TrimixError("the prompt is empty (give some text to continue)")
        if len(tokens) >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt is {len(tokens)} tokens but the context holds {self.n_ctx} "
                "(raise --n-ctx or shorten the prompt)"
            )

    def evaluate_prompt(self, tokens: np.ndarray, roles: Sequence[str] | None = None) -> None:
        """Clear every model's KV cache and decode the prompt, logits at the last position only."""
        self.check_prompt(tokens)
        for r in roles or self.roles:
            m = self.models[r]
            m.clear()
            for start in range(0, len(tokens), m.n_batch):
                m.decode(tokens[start : start + m.n_batch])

    def guard(self, enabled: bool) -> Utf8Guard:
        """The UTF-8 guard (built once per engine and setting: its tables cost a vocabulary pass)."""
        if enabled not in self._guards:
            v = self.vocab
            self._guards[enabled] = Utf8Guard(v.pieces, v.banned, v.eog, enabled=enabled)
        g = self._guards[enabled]
        g.reset()
        return g

    # -- generation -------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[int],
        fusion: FusionPlan,
        *,
        sampling: SamplingParams | None = None,
        max_tokens: int = 256,
        stop: Sequence[str] = (),
        utf8_guard: bool = True,
    ) -> Generation:
        """Fused generation as an iterator of text pieces (see :class:`Generation`)."""
        missing = [r for r in fusion.roles if r not in self.models]
        if missing:
            raise WeightError(f"method {fusion.method} needs the {missing[0]} model, which is not loaded")
        if max_tokens < 0:
            raise TrimixError(f"--max-tokens must be >= 0, got {max_tokens}")
        if isinstance(prompt, str):
            tokens = self.tokenize(prompt)
        else:
            tokens = np.asarray(prompt, dtype=np.int32)
        return Generation(self, tokens, fusion, sampling or SamplingParams(), max_tokens, list(stop), utf8_guard)


def _stop_holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could still become the start of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


@dataclass
class Generation:
    """Iterate to stream text pieces; afterwards ``text``, ``token_ids``, ``finish_reason`` and
    ``timings`` describe the run. The streamed pieces always join to ``text``."""

    engine: Engine
    prompt_tokens: np.ndarray
    fusion: FusionPlan
    sampling: SamplingParams
    max_tokens: int
    stop: list[str]
    utf8_guard: bool
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    timings: Timings = field(default_factory=Timings)

    def __post_init__(self) -> None:
        self._it = self._run()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._it)

    def run(self) -> Generation:
        """Consume the whole generation; returns self for chaining."""
        for _ in self:
            pass
        return self

    def _emit(self, piece: str) -> str:
        self.text += piece
        return piece

    def _run(self) -> Iterator[str]:
        eng, fusion = self.engine, self.fusion
        roles = fusion.roles
        models = [eng.models[r] for r in roles]
        vocab = eng.vocab
        fuser = Fuser(fusion, vocab.n_vocab)
        guard = eng.guard(self.utf8_guard)
        sample = make_sampler(self.sampling, vocab.n_vocab)
        decoder = StreamDecoder()
        pieces, eog, stops = vocab.pieces, vocab.eog, [s for s in self.stop if s]
        t = self.timings
        perf = time.perf_counter

        t0 = perf()
        eng.evaluate_prompt(self.prompt_tokens, roles)
        t.prompt_tokens = len(self.prompt_tokens)
        t.prompt_s = perf() - t0

        rows = {r: m.logits_row(-1) for r, m in zip(roles, models)}
        pending = ""
        t_start = perf()
        decode_s = 0.0
        n_ctx = eng.n_ctx
        while True:
            if len(self.token_ids) >= self.max_tokens:
                self.finish_reason = "length"
                break
            logits = fuser.fuse(rows)
            guard.apply(logits)
            tok = sample(logits)
            if eog[tok]:
                self.finish_reason = "eog"
                break
            self.token_ids.append(tok)
            guard.advance(tok)
            pending += decoder.feed(pieces[tok])
            if stops and pending:
                hits = [i for i in (pending.find(s) for s in stops) if i >= 0]
                if hits:
                    cut = min(hits)
                    if cut:
                        yield self._emit(pending[:cut])
                    pending = ""
                    self.finish_reason = "stop"
                    break
                keep = _stop_holdback(pending, stops)
                if len(pending) > keep:
                    yield self._emit(pending[: len(pending) - keep])
                    pending = pending[len(pending) - keep :]
            elif pending:
                yield self._emit(pending)
                pending = ""
            if len(self.token_ids) >= self.max_tokens:
                self.finish_reason = "length"
                break
            if models[0].n_past >= n_ctx:
                self.finish_reason = "context"
                break
            td = perf()
            for r, m in zip(roles, models):
                m.decode_one(tok)
                rows[r] = m.logits_row(-1)
            decode_s += perf() - td
        pending += decoder.flush()
        if pending:
            yield self._emit(pending)
        t.gen_tokens = len(self.token_ids)
        t.gen_s = perf() - t_start
        t.decode_s = decode_s
