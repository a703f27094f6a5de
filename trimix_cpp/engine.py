"""Loading a set of models by role, evaluating a prompt once, and streaming fused generation.

The loop reads top to bottom like the algorithm: evaluate the prompt in every model, then per step
fuse the last logits of every model, mask what would break UTF-8, pick a token, turn its bytes into
whole characters, and feed the token back to every model. Generation is a generator of text
pieces; what it measured is on the :class:`Generation` object once it is exhausted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import _llama
from .errors import ContextOverflowError, TrimixError, WeightError
from .fusion import LARGE_INS, ROLES, SMALL_BASE, SMALL_CPT, Fuser, FusionPlan, plan
from .sampling import SamplingParams, make_sampler
from .scoring import MethodScore, PerplexityScorer, windows
from .selection import SELECTION_ROLES, GridNLL, GridScores, Selection, Selector, choose, entropy_grid
from .utf8 import StreamDecoder, Utf8Guard
from .vocab import ATTR_CONTROL, SharedVocab, check_same_vocabulary, padding_mask

_USER_DEFINED = 1 << 4

ChunkCallback = Callable[[Mapping[str, np.ndarray], np.ndarray], None]


def _flag(role: str) -> str:
    return "--" + role.replace("_", "-")


def _weights_text(weights: Mapping[str, float]) -> str:
    return ", ".join(f"{r}={w:g}" for r, w in weights.items())


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
    marked = np.flatnonzero((ref_attrs & (ATTR_CONTROL | _USER_DEFINED)) != 0)
    texts = {ref_pieces[t].decode("utf-8", "replace"): int(t) for t in marked.tolist() if ref_pieces[t]}
    return SharedVocab(n_vocab=n, pieces=pieces, banned=banned, eog=eog, specials=texts)


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
        self._running: Generation | None = None  # the generation that owns the KV caches now

    # -- lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        for m in getattr(self, "models", {}).values():
            m.close()
        self.models = {}

    @property
    def closed(self) -> bool:
        return not self.models

    def _check_open(self) -> None:
        if not self.models:
            raise TrimixError("this Engine is closed (open a new one: with tm.Engine(paths) as engine: ...)")

    def _check_idle(self) -> None:
        """Every model has one KV cache, so one thing at a time may use it: a prompt evaluation, or
        one generation from its first step to its last. Starting another while a generation is
        unfinished would overwrite its cache and silently corrupt it, so it is refused."""
        self._check_open()
        running = self._running
        if running is not None and running.finish_reason is None:
            raise TrimixError(
                "another generation on this Engine is still running (finish it, or call its close(), "
                "before starting a new one)"
            )

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- prompt -----------------------------------------------------------------------------------

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.models)

    def tokenize(self, prompt: str, special: bool = False) -> np.ndarray:
        """The prompt's token ids, shared by every model. ``special`` parses control-token text
        (chat markup in a profile's template) into control tokens."""
        self._check_open()
        ref = self.models[self.reference_role]
        return ref.tokenize(prompt, add_bos=ref.add_bos, special=special)

    def check_prompt(self, tokens: np.ndarray) -> None:
        if len(tokens) == 0:
            raise TrimixError("the prompt is empty (give some text to continue)")
        if len(tokens) >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt is {len(tokens)} tokens but the context holds {self.n_ctx} "
                "(raise --n-ctx or shorten the prompt)"
            )

    def evaluate_prompt(
        self,
        tokens: np.ndarray,
        roles: Sequence[str] | None = None,
        on_chunk: ChunkCallback | None = None,
        chunk_rows: int | None = None,
    ) -> None:
        """Clear the KV caches and decode the prompt once in every model, leaving them ready to generate.

        Without ``on_chunk`` only the last position's logits are computed. With it, the prompt goes
        through in chunks of ``chunk_rows`` positions with logits at every position; after each
        chunk ``on_chunk(rows, targets)`` gets every model's (n, n_vocab) logits views and the token
        that follows each position (one fewer for the prompt's last chunk), and must be done with
        the views when it returns, since the next chunk overwrites them.
        """
        self.check_prompt(tokens)
        self._check_idle()
        roles = tuple(roles or self.roles)
        models = [self.models[r] for r in roles]
        for m in models:
            m.clear()
        if on_chunk is None:
            for m in models:
                for start in range(0, len(tokens), m.n_batch):
                    m.decode(tokens[start : start + m.n_batch])
            return
        step = max(1, min(chunk_rows or models[0].n_batch, min(m.n_batch for m in models)))
        all_outputs = np.ones(step, dtype=np.int8)
        for start in range(0, len(tokens), step):
            end = min(len(tokens), start + step)
            for m in models:
                m.decode(tokens[start:end], all_outputs[: end - start])
            rows = {r: m.logits_rows(end - start) for r, m in zip(roles, models)}
            on_chunk(rows, tokens[start + 1 : end + 1])

    def select(self, prompt: str | Sequence[int] | np.ndarray, selector: Selector) -> Selection:
        """Score the grid of (alpha, beta) on the prompt and choose a pair, without labels.

        The prompt is evaluated exactly once per model, and that evaluation leaves every KV cache
        ready for generation (:meth:`generate` with a :class:`Selector` relies on it).
        """
        self._check_open()
        missing = [r for r in SELECTION_ROLES if r not in self.models]
        if missing:
            raise WeightError(f"weight selection needs the {missing[0]} model ({_flag(missing[0])})")
        tokens = self._as_tokens(prompt)
        t0 = time.perf_counter()
        n_vocab = self.vocab.n_vocab
        fallbacks = 0
        strategy, note = selector.strategy, None
        if selector.strategy == "ppl":
            chunk = selector.chunk_rows(
                n_vocab, [self.models[r].n_vocab for r in SELECTION_ROLES], min(m.n_batch for m in self.models.values())
            )
            with GridNLL(selector.alphas, selector.betas, n_vocab, selector.threads) as grid:

                def fold(rows: Mapping[str, np.ndarray], targets: np.ndarray) -> None:
                    grid.add(rows[LARGE_INS], rows[SMALL_CPT], rows[SMALL_BASE], targets)

                self.evaluate_prompt(tokens, SELECTION_ROLES, fold, chunk)
                if grid.scores.n_rows:
                    scores, single = grid.scores.mean_nll, grid.scores.single_mean_nll()
                    fallbacks = grid.scores.n_dense_fallback
            if not grid.scores.n_rows:
                # A one-token prompt predicts nothing, so it has no perplexity. The same evaluation
                # already holds the next token's logits: choose by their entropy instead.
                strategy, note = "ent", f"the prompt has {len(tokens)} token, so no perplexity: chose by entropy"
                last = {r: self.models[r].logits_row(-1)[:n_vocab] for r in SELECTION_ROLES}
                scores = entropy_grid(
                    last[LARGE_INS], last[SMALL_CPT], last[SMALL_BASE], selector.alphas, selector.betas
                )
                single = {}
        else:
            self.evaluate_prompt(tokens, SELECTION_ROLES)
            last = {r: self.models[r].logits_row(-1)[:n_vocab] for r in SELECTION_ROLES}
            scores = entropy_grid(last[LARGE_INS], last[SMALL_CPT], last[SMALL_BASE], selector.alphas, selector.betas)
            single = {}
        return Selection(
            strategy=strategy,
            requested=selector.strategy,
            note=note,
            alphas=selector.alphas,
            betas=selector.betas,
            scores=scores,
            chosen=choose(selector.alphas, selector.betas, scores),
            single_nll=single,
            n_tokens=len(tokens),
            seconds=time.perf_counter() - t0,
            dense_fallbacks=fallbacks,
        )

    def perplexity(
        self,
        text: str,
        plans: Mapping[str, FusionPlan],
        *,
        window: int | None = None,
        max_logits_mib: float = 512.0,
        grid: Selector | None = None,
    ) -> tuple[dict[str, MethodScore], GridScores | None]:
        """NLL of ``text`` under every plan (and, with ``grid``, every pair of a TriMix grid).

        Each model evaluates each window of the text once; all methods are scored from the same
        logits. Windows of ``window`` tokens (default: the context) overlap by half.
        """
        roles = tuple(r for r in ROLES if any(r in p.roles for p in plans.values()) or (grid and r in SELECTION_ROLES))
        missing = [r for r in roles if r not in self.models]
        if missing:
            raise WeightError(f"scoring needs the {missing[0]} model ({_flag(missing[0])}), which is not loaded")
        self._check_open()
        ref = self.models[self.reference_role]
        tokens = ref.tokenize(text, add_bos=False)
        bos = [ref.bos_id] if ref.add_bos else []
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 8):
            raise TrimixError(f"--window must be a whole number of at least 8 tokens, got {window!r}")
        width = min(window or self.n_ctx, self.n_ctx) - len(bos) - 1
        if width < 2:
            raise TrimixError(f"a scoring window of {window or self.n_ctx} tokens is too small (give at least 8)")
        if len(tokens) < 1:
            raise TrimixError("the text to score is empty")
        if len(tokens) + len(bos) < 2:
            raise TrimixError(
                "the text is a single token and this model adds no BOS token, so no token is predicted "
                "(give a longer text)"
            )
        n_vocab = self.vocab.n_vocab
        scorer = PerplexityScorer(plans, n_vocab)
        grid_nll = GridNLL(grid.alphas, grid.betas, n_vocab, grid.threads) if grid else None
        sizes = [self.models[r].n_vocab for r in roles]
        budget = Selector(max_logits_mib=max_logits_mib)
        chunk = budget.chunk_rows(n_vocab, sizes, min(self.models[r].n_batch for r in roles))
        try:
            for start, end, first_new in windows(len(tokens), width):
                seq = np.asarray(bos + tokens[start:end].tolist(), dtype=np.int32)
                seen = 0

                def fold(rows: Mapping[str, np.ndarray], targets: np.ndarray, start=start, first_new=first_new) -> None:
                    nonlocal seen
                    n = len(targets)
                    # row j is sequence position seen + j; its target is text token start + seen + j + 1 - len(bos)
                    first = start + seen + 1 - len(bos)
                    j0 = max(0, first_new - first)
                    if j0 < n:
                        part = {r: x[j0:n] for r, x in rows.items()}
                        scorer.add(part, targets[j0:])
                        if grid_nll is not None:
                            grid_nll.add(part[LARGE_INS], part[SMALL_CPT], part[SMALL_BASE], targets[j0:])
                    seen += len(next(iter(rows.values())))

                self.evaluate_prompt(seq, roles, fold, chunk)
        finally:
            if grid_nll is not None:
                grid_nll.close()
        return scorer.scores, (grid_nll.scores if grid_nll is not None else None)

    def continuation_nll(self, prompt: str | np.ndarray, continuation: str, fusion: FusionPlan) -> float:
        """Mean NLL per token of ``continuation`` after ``prompt`` under ``fusion`` (multiple choice
        by likelihood). Positions before the continuation produce logits that are not read."""
        ref = self.models[self.reference_role]
        head = self._as_tokens(prompt)
        tail = ref.tokenize(continuation, add_bos=False)
        if len(tail) == 0:
            raise TrimixError("an answer option is empty")
        seq = np.concatenate([head, tail]).astype(np.int32)
        scorer = PerplexityScorer({"m": fusion}, self.vocab.n_vocab)
        sizes = [self.models[r].n_vocab for r in fusion.roles]
        chunk = Selector().chunk_rows(self.vocab.n_vocab, sizes, min(self.models[r].n_batch for r in fusion.roles))
        seen = 0

        def fold(rows: Mapping[str, np.ndarray], targets: np.ndarray) -> None:
            nonlocal seen
            j0 = max(0, len(head) - 1 - seen)  # row j predicts seq[seen + j + 1]
            if j0 < len(targets):
                scorer.add({r: x[j0 : len(targets)] for r, x in rows.items()}, targets[j0:])
            seen += len(next(iter(rows.values())))

        self.evaluate_prompt(seq, fusion.roles, fold, chunk)
        return scorer.scores["m"].nll

    def _as_tokens(self, prompt: str | Sequence[int] | np.ndarray) -> np.ndarray:
        if isinstance(prompt, str):
            return self.tokenize(prompt)
        return np.asarray(prompt, dtype=np.int32)

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
        fusion: FusionPlan | Selector,
        *,
        sampling: SamplingParams | None = None,
        max_tokens: int = 256,
        stop: Sequence[str] = (),
        utf8_guard: bool = True,
    ) -> Generation:
        """Fused generation as an iterator of text pieces (see :class:`Generation`).

        ``fusion`` is either fixed weights (a :class:`FusionPlan`) or a :class:`Selector`, which
        picks TriMix's (alpha, beta) on this prompt during the prompt evaluation generation needs
        anyway.
        """
        self._check_open()
        roles = SELECTION_ROLES if isinstance(fusion, Selector) else fusion.roles
        missing = [r for r in roles if r not in self.models]
        if missing:
            raise WeightError(f"this method needs the {missing[0]} model ({_flag(missing[0])}), which is not loaded")
        check_max_tokens(max_tokens)
        tokens = self._as_tokens(prompt)
        return Generation(self, tokens, fusion, sampling or SamplingParams(), max_tokens, list(stop), utf8_guard)


def check_max_tokens(max_tokens: object) -> None:
    """A whole number of tokens: a float such as NaN would compare false against every count and
    run generation to the end of the context."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 0:
        raise TrimixError(f"--max-tokens must be a whole number >= 0, got {max_tokens!r}")


class NonFiniteLogitsError(TrimixError):
    """The fused logits of a step hold NaN or infinity."""


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
    ``timings`` describe the run (and ``selection`` the weight choice, when one was made). The
    streamed pieces always join to ``text``. ``fusion`` is the plan actually used once the
    prompt has been evaluated."""

    engine: Engine
    prompt_tokens: np.ndarray
    fusion: FusionPlan | Selector
    sampling: SamplingParams
    max_tokens: int
    stop: list[str]
    utf8_guard: bool
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    timings: Timings = field(default_factory=Timings)
    selection: Selection | None = None

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

    def close(self) -> None:
        """Stop early (a generation abandoned half-way still holds the engine until closed)."""
        if self.finish_reason is None:
            self.finish_reason = "cancelled"
        self._it.close()

    def _emit(self, piece: str) -> str:
        self.text += piece
        return piece

    def _run(self) -> Iterator[str]:
        eng = self.engine
        vocab = eng.vocab
        sample = make_sampler(self.sampling, vocab.n_vocab)
        decoder = StreamDecoder()
        pieces, eog, stops = vocab.pieces, vocab.eog, [s for s in self.stop if s]
        t = self.timings
        perf = time.perf_counter

        t0 = perf()
        if isinstance(self.fusion, Selector):
            self.selection = eng.select(self.prompt_tokens, self.fusion)
            alpha, beta = self.selection.chosen
            self.fusion = plan("trimix", alpha=alpha, beta=beta)
        else:
            eng.evaluate_prompt(self.prompt_tokens, self.fusion.roles)
        t.prompt_tokens = len(self.prompt_tokens)
        t.prompt_s = perf() - t0
        fusion = self.fusion
        roles = fusion.roles
        models = [eng.models[r] for r in roles]
        fuser = Fuser(fusion, vocab.n_vocab)
        guard = eng.guard(self.utf8_guard)
        eng._running = self

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
            top = logits.max()
            if not np.isfinite(top):
                self.finish_reason = "error"
                raise NonFiniteLogitsError(
                    f"the fused logits of step {len(self.token_ids) + 1} are not finite ({top}): a model "
                    f"gave NaN or infinite logits, or the weights {_weights_text(fusion.weights)} are too "
                    "large (use weights of a size like those of the paper, in [-1, 1])"
                )
            guard.apply(logits)
            tok = sample(logits)
            if logits[tok] == -np.inf:
                # Every token was masked: Contrastive Decoding's plausibility set held only tokens
                # the UTF-8 guard forbids. Relax the plausibility constraint, never the guard.
                logits = fuser.fuse(rows, constrained=False)
                guard.apply(logits)
                tok = sample(logits)
                if logits[tok] == -np.inf:
                    self.finish_reason = "no-valid-token"
                    break
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
