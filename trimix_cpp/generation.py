"""Fused generation for many sequences at once: requests, the batched step, and their outputs.

The loop reads like the algorithm, for every active sequence at once:

1. admit waiting requests: evaluate each prompt once (choosing weights on the way when asked to),
   share its KV cells with every sequence that continues it, and pick each sequence's first token;
2. decode the last picked token of every active sequence: one ``llama_decode`` per model, holding
   one token of every sequence whose method uses that model;
3. for every sequence, fuse its rows of logits, mask what would break UTF-8, pick a token, turn its
   bytes into whole characters, check stop strings, and queue the text for whoever reads it.

A :class:`Session` keeps a conversation's tokens in the cache between requests: the next prompt
reuses their longest common prefix and evaluates only the rest (see :meth:`Scheduler.submit`).

Logits are read where llama.cpp left them (zero-copy views) and consumed within the step that made
them, so nothing vocabulary-sized is copied or allocated per step: the fused rows of the batch live
in one preallocated buffer. Each sequence owns its sampler (seeded), its UTF-8 guard state, its
decoder and its stop matcher, so no sequence can change another's output.

A :class:`Generation` is one sequence's view: iterate it to stream its text. Iterating drives the
scheduler, so generations started side by side on one engine all advance, each buffering its own
text until read.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .errors import ContextOverflowError, TrimixError, WeightError
from .fusion import LARGE_INS, SMALL_BASE, SMALL_CPT, Fuser, FusionPlan, plan
from .prefill import evaluate_prompt
from .sampling import Penalties, SamplingParams, TokenSampler, greedy
from .selection import SELECTION_ROLES, GridNLL, GridRows, Selection, Selector
from .speculative import MAX_DRAFT, Drafter, draft_plan, run_round, usable
from .threads import ThreadGovernor
from .utf8 import ACCEPT, StreamDecoder

if TYPE_CHECKING:
    from ._llama import LlamaModel
    from .utf8 import Utf8Guard
    from .vocab import SharedVocab


class Models(Protocol):
    """What the scheduler needs of an engine: the models by role, their shared vocabulary, the
    context of one sequence, the UTF-8 guard tables and the prompt check."""

    models: dict[str, LlamaModel]
    vocab: SharedVocab
    n_ctx: int

    def guard(self, enabled: bool) -> Utf8Guard: ...

    def check_prompt(self, tokens: np.ndarray) -> None: ...


class NonFiniteLogitsError(TrimixError):
    """The fused logits of a step hold NaN or infinity."""


class GenerationCancelled(TrimixError):
    """A generation was cancelled before it finished."""


@dataclass(frozen=True)
class SeqSpec:
    """One sequence to generate after a prompt: its weights (fixed, or a selector that picks them on
    the prompt) and its decoding settings."""

    fusion: FusionPlan | Selector
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    utf8_guard: bool = True
    draft: int = 0  # tokens the small models draft per round for the large ones to check (0: off)
    logprobs: int | None = None  # log-probabilities of each picked token and of this many alternatives (None: off)

    @property
    def roles(self) -> tuple[str, ...]:
        return SELECTION_ROLES if isinstance(self.fusion, Selector) else self.fusion.roles


def check_max_tokens(max_tokens: object) -> None:
    """A whole number of tokens: a float such as NaN would compare false against every count and
    run generation to the end of the context."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 0:
        raise TrimixError(f"--max-tokens must be a whole number >= 0, got {max_tokens!r}")


MAX_TOP_LOGPROBS = 20


def check_logprobs(logprobs: object) -> None:
    if logprobs is None:
        return
    whole = isinstance(logprobs, (int, np.integer)) and not isinstance(logprobs, bool)
    if not whole or not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise TrimixError(
            f"--top-logprobs must be a whole number from 0 to {MAX_TOP_LOGPROBS} (alternatives shown per token), "
            f"got {logprobs!r}"
        )


@dataclass(frozen=True)
class TokenLogprob:
    """A picked token's log-probability under the fused distribution, and the most likely alternatives."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def check_draft(draft: object) -> None:
    if isinstance(draft, bool) or not isinstance(draft, (int, np.integer)) or not 0 <= draft <= MAX_DRAFT:
        raise TrimixError(f"--draft must be a whole number from 0 (off) to {MAX_DRAFT}, got {draft!r}")


@dataclass
class Timings:
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    gen_tokens: int = 0
    gen_s: float = 0.0
    decode_s: float = 0.0  # time inside llama_decode during generation (the batch's, all models)
    queued_s: float = 0.0  # time waiting for a free sequence before the prompt was evaluated
    cached_tokens: int = 0  # prompt tokens a conversation's cache already held (not evaluated again)
    draft_tokens: int = 0  # tokens the small models drafted (speculative decoding)
    accepted_tokens: int = 0  # drafted tokens the fused distribution accepted

    @property
    def rejected_tokens(self) -> int:
        return self.draft_tokens - self.accepted_tokens

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
            "queued_s": round(self.queued_s, 6),
            "cached_tokens": self.cached_tokens,
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "rejected_tokens": self.rejected_tokens,
        }


class Generation:
    """One sequence's output. Iterate to stream text pieces; afterwards ``text``, ``token_ids``,
    ``finish_reason`` and ``timings`` describe the run, ``fusion`` is the plan actually used and
    ``selection`` the weight choice, when one was made. The streamed pieces always join to ``text``.
    """

    def __init__(self, scheduler: Scheduler, prompt_tokens: np.ndarray, spec: SeqSpec) -> None:
        self._scheduler = scheduler
        self.prompt_tokens = prompt_tokens
        self.spec = spec
        self.fusion: FusionPlan | Selector = spec.fusion
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.timings = Timings(prompt_tokens=len(prompt_tokens))
        self.selection: Selection | None = None
        self.logprobs: list[TokenLogprob] | None = [] if spec.logprobs is not None else None
        self.error: BaseException | None = None
        self._pieces: deque[str] = deque()
        self._cancel = False
        self._submitted = time.perf_counter()

    # the settings, as they were before the split into a spec
    @property
    def sampling(self) -> SamplingParams:
        return self.spec.sampling

    @property
    def max_tokens(self) -> int:
        return self.spec.max_tokens

    @property
    def stop(self) -> list[str]:
        return list(self.spec.stop)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        while not self._pieces:
            if self.error is not None:
                raise self.error
            if self.finish_reason is not None:
                raise StopIteration
            self._scheduler.step()
        return self._pieces.popleft()

    def take(self) -> list[str]:
        """The text pieces ready now, without driving the engine (for a loop that steps the
        scheduler itself, such as a server's worker thread)."""
        out = list(self._pieces)
        self._pieces.clear()
        return out

    def run(self) -> Generation:
        """Consume the whole generation; returns self for chaining."""
        for _ in self:
            pass
        return self

    def as_dict(self) -> dict[str, object]:
        """What ``trimix generate --json`` prints: text, tokens, weights, why it stopped, timings."""
        fusion = self.fusion
        out: dict[str, object] = {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "method": fusion.method if isinstance(fusion, FusionPlan) else "trimix",
            "weights": dict(fusion.weights) if isinstance(fusion, FusionPlan) else {},
            "finish_reason": self.finish_reason,
            "timings": self.timings.as_dict(),
        }
        if self.selection is not None:
            out["selection"] = self.selection.as_dict()
        if self.logprobs is not None:
            pieces = self._scheduler.engine.vocab.pieces
            out["logprobs"] = [
                {
                    **_token_entry(pieces, lp.token, lp.logprob),
                    "top_logprobs": [_token_entry(pieces, t, v) for t, v in lp.top],
                }
                for lp in self.logprobs
            ]
        return out

    def cancel(self) -> None:
        """Ask for this generation to stop at the next step (safe from any thread)."""
        self._cancel = True

    def close(self) -> None:
        """Stop now and free the sequence (from the thread that drives the engine)."""
        self._cancel = True
        self._scheduler.reap()

    def __del__(self) -> None:  # an abandoned generation frees its sequence at the next step
        self._cancel = True


class Session:
    """A conversation kept in the KV cache of every model between its turns.

    A session owns one llama.cpp sequence id for its whole life. Each request made with it (one
    sequence, see :meth:`Scheduler.submit`) reuses the longest common prefix of its prompt and the
    tokens the cache holds (the previous prompt and the reply generated to it: a chat's next prompt
    repeats both), drops the cells after it, and evaluates only the rest. Perplexity selection still
    scores the whole prompt: the per-position NLL of the grid is kept beside the cells
    (:class:`~trimix_cpp.selection.GridRows`), including the rows of the generated tokens, folded as
    they are picked. Close it (or use it as a context manager) to give the cells and the id back.
    """

    def __init__(self, scheduler: Scheduler, seq_id: int) -> None:
        self._scheduler = scheduler
        self.id = seq_id
        self.tokens = np.zeros(0, dtype=np.int32)  # the history: last prompt and the tokens picked after it
        self.held: dict[str, int] = {}  # leading tokens of the history in each model's cells
        self.grid: GridRows | None = None  # per-position NLL of the last perplexity grid used
        self.cells = 0  # KV cells held between requests
        self.busy = False
        self.closed = False

    def close(self) -> None:
        self._scheduler.close_session(self)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _token_entry(pieces: Sequence[bytes], token: int, logprob: float) -> dict[str, object]:
    """One token as the OpenAI API shows it: its text, its bytes (a piece may be part of a character)."""
    raw = pieces[token]
    return {"id": token, "token": raw.decode("utf-8", "replace"), "bytes": list(raw), "logprob": logprob}


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


@dataclass
class _Request:
    prompt: np.ndarray
    gens: list[Generation]
    cells: int  # KV cells reserved while it runs: the prompt once, plus each sequence's new tokens
    running: int = 0  # its sequences still active; the shared prompt cells go with the last one
    spare: list[int] = field(default_factory=list)  # its llama.cpp sequence ids no branch holds now
    session: Session | None = None


class _Branch:
    """One llama.cpp sequence id: a token history shared by every sequence that has produced exactly
    those tokens so far. A model's logits depend on the tokens alone, not on the weights that chose
    them, so sequences that agree (the grid pairs of an evaluation often do, for many tokens) decode
    once per model between them. When their next tokens differ, the branch forks: the new branch
    shares the old one's cells (``seq_cp``: no copy in a shared cache, a copy of the parent's cache
    when each sequence has its own) and goes on with its own tokens."""

    __slots__ = ("id", "kv_roles", "members", "n_past", "next_token", "request", "rows")

    def __init__(self, seq_id: int, n_past: int, kv_roles: tuple[str, ...], request: _Request) -> None:
        self.id = seq_id
        self.n_past = n_past  # positions in the KV cache
        self.next_token = -1  # picked, not yet decoded
        self.kv_roles = kv_roles  # models where this sequence id holds cells
        self.request = request
        self.members: list[_Seq] = []
        self.rows: dict[str, np.ndarray] = {}  # each model's logits after the last decoded token

    def roles(self) -> tuple[str, ...]:
        """The models this branch decodes in: those its members use."""
        used = {r for s in self.members for r in s.roles}
        return tuple(r for r in self.kv_roles if r in used)


class _Seq:
    """The state of one active sequence: its weights, sampler, UTF-8 guard state, decoder and stop
    matcher, and the branch (llama.cpp sequence) that holds its tokens."""

    __slots__ = (
        "branch",
        "cells",
        "decoder",
        "drafter",
        "fold",
        "followers",
        "fuser",
        "gen",
        "guard",
        "key",
        "penalties",
        "pending",
        "pick",
        "request",
        "roles",
        "sampler",
        "slot",
        "started",
        "state",
        "stops",
    )

    def __init__(self, gen: Generation, branch: _Branch, cells: int, request: _Request) -> None:
        self.gen = gen
        self.request = request
        self.branch = branch
        self.slot = -1
        self.drafter: Drafter | None = None
        self.followers: list[Generation] = []  # generations with the very same settings: same output
        self.key: tuple = ()
        self.cells = cells
        self.roles: tuple[str, ...] = ()
        self.pick = -1  # the token chosen this step, before the branches regroup
        self.state = ACCEPT
        self.decoder = StreamDecoder()
        self.pending = ""
        self.stops = [s for s in gen.spec.stop if s]
        self.started = 0.0
        self.fold: GridNLL | None = None  # a conversation's grid rows, extended by every token picked
        self.penalties: Penalties | None = None

    # the branch's fields, as a sequence alone in its branch (a drafting one) sees them
    @property
    def id(self) -> int:
        return self.branch.id

    @property
    def n_past(self) -> int:
        return self.branch.n_past

    @n_past.setter
    def n_past(self, value: int) -> None:
        self.branch.n_past = value

    @property
    def next_token(self) -> int:
        return self.branch.next_token

    @next_token.setter
    def next_token(self, value: int) -> None:
        self.branch.next_token = value

    @property
    def rows(self) -> dict[str, np.ndarray]:
        return self.branch.rows


def _same_output_key(spec: SeqSpec, fusion: FusionPlan) -> tuple:
    """Sequences with equal keys produce the same tokens: the same non-zero weights and constraint,
    and the same decoding settings (sampling with the same seed included)."""
    weights = tuple(sorted((r, w) for r, w in fusion.weights.items() if w != 0.0))
    return (
        weights,
        fusion.plausibility_role,
        fusion.plausibility_alpha,
        spec.sampling,
        spec.max_tokens,
        spec.stop,
        spec.utf8_guard,
        spec.draft,
        spec.logprobs,
    )


def _stop_holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could still become the start of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _weights_text(weights: Mapping[str, float]) -> str:
    return ", ".join(f"{r}={w:g}" for r, w in weights.items())


def locked(method: Callable) -> Callable:
    """Run ``method`` holding ``self.lock`` (the engine's re-entrant lock): llama.cpp's contexts
    and the scheduler's state must never be used from two threads at once."""

    @functools.wraps(method)
    def run_locked(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)

    return run_locked


class Scheduler:
    """Admits requests as sequences and KV cells allow, and steps every active sequence together.

    Continuous batching: a request joins the running batch at the next step and leaves it when
    done; requests beyond ``n_seq`` sequences or the KV cache wait in a queue, first come first
    served. Every failure is stored on the generations it concerns and raised to whoever reads
    them, so one bad request never stops the others.
    """

    def __init__(self, engine: Models, n_seq: int, kv_cells: int, shared_prompt: bool = True) -> None:
        self.engine = engine
        self.lock: threading.RLock = getattr(engine, "lock", None) or threading.RLock()
        self.n_seq = n_seq
        self.kv_cells = kv_cells
        # whether a request's sequences share its prompt's cells (one unified cache) or each holds
        # a copy (a cache per sequence): the cells a request reserves count the prompt once or per sequence
        self.shared_prompt = shared_prompt
        self.cells_free = kv_cells
        self.free_ids = list(range(n_seq - 1, -1, -1))
        self.queue: deque[_Request] = deque()
        self.active: list[_Seq] = []
        v = engine.vocab.n_vocab
        self.fused = np.empty((n_seq, v), dtype=np.float32)
        self._tmp = np.empty(v, dtype=np.float32)
        self._mask = np.empty(v, dtype=bool)
        self._slots = list(range(n_seq))  # rows of ``fused`` not in use
        self.steps = 0
        self.decode_s = 0.0
        # follows what a step costs with every core and with one (trimix_cpp.threads); the engine sets
        # it when the user left the thread count to trimix
        self.governor: ThreadGovernor | None = None
        # called with (generation, per-model rows, fused row) before the guard masks it: for tests
        # and diagnostics that compare the fusion with each model's own logits
        self.observer: Callable[[Generation, Mapping[str, np.ndarray], np.ndarray], None] | None = None

    # -- requests ---------------------------------------------------------------------------------

    @locked
    def open_session(self) -> Session:
        """A conversation that keeps its tokens in the cache between requests (holds one sequence id)."""
        if not self.free_ids:
            raise TrimixError(
                f"no free sequence for a conversation: all {self.n_seq} are in use (raise --parallel or close one)"
            )
        return Session(self, self.free_ids.pop())

    @locked
    def close_session(self, session: Session) -> None:
        """Free a session's cells and sequence id (its running generation, if any, is cancelled)."""
        if session.closed:
            return
        if session.busy:
            for req in [*self.queue, *(s.request for s in self.active)]:
                if req.session is session:
                    for g in req.gens:
                        g.cancel()
            self.reap()
        self._reset_session(session)
        session.closed = True
        self.free_ids.append(session.id)

    def _reset_session(self, session: Session) -> None:
        """Forget a session's history and drop its cells."""
        for m in self.engine.models.values():
            m.seq_rm(session.id)
        self.cells_free += session.cells
        session.cells = 0
        session.tokens = np.zeros(0, dtype=np.int32)
        session.held = {}
        session.grid = None
        session.busy = False

    def _keep_session(self, s: _Seq) -> None:
        """After a conversation's request: its prompt and the tokens picked stay in the cache."""
        req = s.request
        session = req.session
        assert session is not None
        if s.gen.finish_reason == "error":
            self._reset_session(session)
            return
        session.tokens = np.concatenate([req.prompt, np.asarray(s.gen.token_ids, dtype=np.int32)])
        for r in s.branch.kv_roles:
            session.held[r] = s.branch.n_past if r in s.roles else len(req.prompt)
        session.cells = max(session.held.values(), default=0)
        self.cells_free -= session.cells
        session.busy = False

    @locked
    def submit(self, prompt: np.ndarray, specs: Sequence[SeqSpec], session: Session | None = None) -> list[Generation]:
        """Queue a prompt with the sequences that continue it; their generations start at the next step.
        With ``session``, one sequence that reuses (and extends) the session's cached tokens."""
        eng = self.engine
        if not specs:
            raise TrimixError("a request needs at least one sequence to generate")
        if session is not None:
            if session.closed:
                raise TrimixError("this conversation is closed")
            if session.busy:
                raise TrimixError("this conversation is still generating a reply (wait for it or cancel it)")
            if len(specs) != 1:
                raise TrimixError("a conversation generates one reply per request")
            if specs[0].draft:
                raise TrimixError("--draft (speculative decoding) is not available in a conversation (use --draft 0)")
        if len(specs) > self.n_seq:
            raise TrimixError(
                f"this request needs {len(specs)} sequences but the engine holds {self.n_seq} (raise --parallel)"
            )
        for spec in specs:
            check_max_tokens(spec.max_tokens)
            check_draft(spec.draft)
            check_logprobs(spec.logprobs)
            spec.sampling.validate()
            if spec.draft and (spec.sampling.penalized or spec.logprobs is not None):
                what = "repetition penalties" if spec.sampling.penalized else "logprobs"
                raise TrimixError(f"--draft (speculative decoding) cannot be combined with {what} (use --draft 0)")
            missing = [r for r in spec.roles if r not in eng.models]
            if missing:
                flag = "--" + missing[0].replace("_", "-")
                raise WeightError(f"this method needs the {missing[0]} model ({flag}), which is not loaded")
            if spec.draft and isinstance(spec.fusion, FusionPlan) and draft_plan(spec.fusion) is None:
                raise TrimixError(
                    f"--draft lets small models draft for a large one, but --method {spec.fusion.method} has no large "
                    "model or no small-cpt model (use --draft 0)"
                )
        eng.check_prompt(prompt)
        room = eng.n_ctx - len(prompt)
        cells = sum(self._seq_cells(len(prompt), min(s.max_tokens + s.draft, room)) for s in specs)
        if self.shared_prompt:
            cells += len(prompt)
        if cells > self.kv_cells:
            raise ContextOverflowError(
                f"this request needs {cells} KV cells (a {len(prompt)}-token prompt and {len(specs)} sequences) "
                f"but the cache holds {self.kv_cells} (raise --n-ctx or lower --parallel or --max-tokens)"
            )
        gens = [Generation(self, prompt, spec) for spec in specs]
        self.queue.append(_Request(prompt, gens, cells, session=session))
        if session is not None:
            session.busy = True
        return gens

    def _seq_cells(self, n_prompt: int, n_new: int) -> int:
        """Cells one sequence reserves: its new tokens, plus its copy of the prompt when each
        sequence has a cache of its own."""
        return n_new if self.shared_prompt else n_prompt + n_new

    @locked
    def reap(self) -> None:
        """Drop cancelled generations: queued ones leave the queue, active ones free their sequence."""
        for req in list(self.queue):
            for g in [g for g in req.gens if g._cancel and g.finish_reason is None]:
                g.finish_reason = "cancelled"
            req.gens = [g for g in req.gens if g.finish_reason is None]
            if not req.gens:
                self.queue.remove(req)
                if req.session is not None:
                    req.session.busy = False
        for s in self.active:
            for f in [f for f in s.followers if f._cancel]:
                s.followers.remove(f)
                f.finish_reason = "cancelled"
            while s.gen._cancel and s.followers:  # a follower takes over the sequence
                s.gen.finish_reason = "cancelled"
                s.gen = s.followers.pop(0)
        for s in [s for s in self.active if s.gen._cancel]:
            self._finish(s, "cancelled")

    @property
    def idle(self) -> bool:
        return not self.queue and not self.active

    # -- the step ---------------------------------------------------------------------------------

    @locked
    def step(self) -> None:
        """Admit what fits, decode every active sequence's last token, pick every next token."""
        self.reap()
        self._admit()
        if not self.active:
            if self.queue:  # nothing runs and the head still does not fit: it never will
                req = self.queue.popleft()
                if req.session is not None:
                    req.session.busy = False
                self._fail(req.gens, TrimixError("the request does not fit in the KV cache (raise --n-ctx)"))
            return
        batch = list(self.active)
        n_ctx = self.engine.n_ctx
        drafting = [s for s in batch if len(s.branch.members) == 1 and usable(s, n_ctx) > 0 and s.drafter.ready()]
        plain = [s for s in batch if s not in drafting]
        self.steps += 1
        for group, kind in ((plain, "plain"), (drafting, "draft")):
            if not group:
                continue
            before = self._decode_seconds()
            try:
                if kind == "plain":
                    self._decode(group)
                else:
                    run_round(self, group)
            except Exception as e:  # a failed llama_decode leaves the batch's cells unusable: end it
                for s in group:
                    if s.gen.finish_reason is None:
                        self._finish(s, "error", e)
                continue
            spent = self._decode_seconds() - before
            self.decode_s += spent
            for s in group:
                s.gen.timings.decode_s += spent
            if kind == "plain":
                if self.governor is not None:
                    self.governor.observe(len({s.branch for s in group}), spent)
                self._advance_all(group)

    def _decode_seconds(self) -> float:
        return sum(m.decode_s for m in self.engine.models.values())

    @locked
    def run(self, gens: Sequence[Generation]) -> None:
        """Step until every generation in ``gens`` is finished (their text stays readable)."""
        while any(g.finish_reason is None for g in gens):
            self.step()

    def _admit(self) -> None:
        while self.queue:
            req = self.queue[0]
            own = req.session
            ids, cells = len(req.gens) - (own is not None), req.cells - (own.cells if own is not None else 0)
            if ids > len(self.free_ids) or cells > self.cells_free:
                return
            self.queue.popleft()
            self._prefill(req)

    def _prefill(self, req: _Request) -> None:
        """Evaluate the prompt once, choose weights, pick every sequence's first token."""
        eng = self.engine
        session = req.session
        if session is not None:
            ids = [session.id]
            self.cells_free += session.cells
            session.cells = 0
        else:
            ids = [self.free_ids.pop() for _ in req.gens]
        self.cells_free -= req.cells
        started = time.perf_counter()
        roles = tuple(r for r in eng.models if any(r in g.spec.roles for g in req.gens))
        selectors = [g.spec.fusion for g in req.gens if isinstance(g.spec.fusion, Selector)]
        seqs: list[_Seq] = []
        room = eng.n_ctx - len(req.prompt)
        root = _Branch(ids[0], len(req.prompt), roles, req)
        req.spare = ids[1:]
        held, rows = self._reuse(session, req.prompt, roles, selectors) if session is not None else (None, None)
        try:
            ev = evaluate_prompt(
                eng.models, eng.vocab.n_vocab, req.prompt, ids[0], roles, selectors, held=held, rows=rows
            )
            root.rows = {r: eng.models[r].logits_row(-1) for r in roles}
        except Exception as e:
            self.cells_free += req.cells
            if session is not None:
                self._reset_session(session)
            else:
                for m in eng.models.values():
                    m.seq_rm(ids[0])
                self.free_ids.extend(ids)
            self._fail(req.gens, e)
            return
        if session is not None:
            session.tokens = req.prompt
            session.held.update({r: len(req.prompt) for r in roles})
        for g in req.gens:
            g.timings.queued_s = started - g._submitted
            g.timings.prompt_s = ev.seconds
            g.timings.cached_tokens = len(req.prompt) - ev.evaluated
            if isinstance(g.spec.fusion, Selector):
                g.selection = ev.selections[g.spec.fusion]
                a, b = g.selection.chosen
                g.fusion = plan("trimix", alpha=a, beta=b)
            fusion = g.fusion
            assert isinstance(fusion, FusionPlan)
            key = _same_output_key(g.spec, fusion)
            leader = next((x for x in seqs if x.key == key), None)
            if leader is not None:
                # the same weights and settings give the same tokens: follow, with no sequence
                leader.followers.append(g)
                self.free_ids.append(req.spare.pop())
                self.cells_free += self._seq_cells(len(req.prompt), min(g.spec.max_tokens + g.spec.draft, room))
                continue
            s = _Seq(g, root, self._seq_cells(len(req.prompt), min(g.spec.max_tokens + g.spec.draft, room)), req)
            s.key = key
            s.roles = fusion.roles
            s.started = time.perf_counter()
            s.slot = self._slots.pop()
            s.fuser = Fuser(fusion, eng.vocab.n_vocab, self.fused[s.slot], self._tmp, self._mask)
            s.sampler = greedy if g.spec.sampling.greedy else TokenSampler(g.spec.sampling, eng.vocab.n_vocab)
            s.guard = eng.guard(g.spec.utf8_guard)
            if g.spec.sampling.penalized:
                s.penalties = Penalties(g.spec.sampling, eng.n_ctx, req.prompt)
            if ev.kept is not None and all(r in fusion.roles for r in SELECTION_ROLES):
                s.fold, ev.kept = ev.kept, None
            if g.spec.draft and draft_plan(fusion) is not None:
                s.drafter = Drafter(fusion, g.spec.draft, g.spec.sampling, eng.vocab.n_vocab)
            root.members.append(s)
            seqs.append(s)
            self.active.append(s)
        if ev.kept is not None:
            ev.kept.close()
        req.running = len(seqs)
        self._advance_all(seqs)

    def _reuse(
        self, session: Session, prompt: np.ndarray, roles: Sequence[str], selectors: Sequence[Selector]
    ) -> tuple[dict[str, int], GridRows | None]:
        """What of a session's cache a new prompt can reuse: the tokens each model holds up to the
        common prefix (the cells after it are dropped), and the grid rows whose tokens are in it.
        Models this request does not use give their cells up, so the cells the scheduler counts
        for the session while it runs are the request's own."""
        common = _common_prefix(session.tokens, prompt)
        for r, n in list(session.held.items()):
            if r not in roles:
                self.engine.models[r].seq_rm(session.id)
                del session.held[r]
            elif n > common:
                self.engine.models[r].seq_rm(session.id, common, -1)
                session.held[r] = common
        if session.grid is not None:
            session.grid.truncate(max(common - 1, 0))  # row j predicts token j + 1
        ppl = [s for s in selectors if s.strategy == "ppl"]
        if ppl and (session.grid is None or not session.grid.matches(ppl[0].alphas, ppl[0].betas)):
            session.grid = GridRows(ppl[0].alphas, ppl[0].betas)
        return dict(session.held), session.grid if ppl else None

    def _decode(self, batch: Sequence[_Seq]) -> None:
        """The pending token of every branch into every model its sequences use, in one decode per model."""
        branches = list(dict.fromkeys(s.branch for s in batch))
        for b in branches:
            b.rows = {}
        for role, m in self.engine.models.items():
            users = [b for b in branches if role in b.roles()]
            if not users:
                continue
            n = len(users)
            tokens = np.fromiter((b.next_token for b in users), dtype=np.int32, count=n)
            pos = np.fromiter((b.n_past for b in users), dtype=np.int32, count=n)
            ids = np.fromiter((b.id for b in users), dtype=np.int32, count=n)
            m.decode_batch(tokens, pos, ids, 1)
            rows = m.logits_rows(n)
            for k, b in enumerate(users):
                b.rows[role] = rows[k]
        for b in branches:
            b.n_past += 1

    def _advance_all(self, seqs: Sequence[_Seq]) -> None:
        """Every sequence picks its next token; then each branch keeps the sequences that agree and
        forks for the others (a drafting sequence always gets a branch of its own)."""
        branches = list(dict.fromkeys(s.branch for s in seqs))
        for s in seqs:
            self._advance(s)
        for b in branches:
            groups: dict[object, list[_Seq]] = {}
            for s in b.members:
                key = ("solo", id(s)) if s.drafter is not None else s.pick
                groups.setdefault(key, []).append(s)
            if not groups:
                continue
            (first, *rest) = groups.values()
            b.members = first
            b.next_token = first[0].pick
            for group in rest:
                self._fork(b, group)

    def _fork(self, parent: _Branch, group: list[_Seq]) -> None:
        """A new branch for ``group``, holding ``parent``'s cells so far (shared, or copied)."""
        req = parent.request
        seq_id = req.spare.pop()
        roles = tuple(r for r in parent.kv_roles if any(r in s.roles for s in group))
        for r in roles:
            self.engine.models[r].seq_cp(parent.id, seq_id)
        child = _Branch(seq_id, parent.n_past, roles, req)
        child.members = group
        child.next_token = group[0].pick
        child.rows = parent.rows
        for s in group:
            s.branch = child

    def _advance(self, s: _Seq) -> None:
        """Pick the sequence's next token from its rows (into ``s.pick``), and stream what it completes."""
        s.pick = -1
        if len(s.gen.token_ids) >= s.gen.spec.max_tokens:
            self._finish(s, "length")
            return
        logits = self.masked_logits(s, s.rows)
        if logits is None:
            return
        if s.penalties is not None:
            s.penalties.apply(logits)
        tok = s.sampler(logits)
        if logits[tok] == -np.inf:
            # Every token was masked: Contrastive Decoding's plausibility set held only tokens the
            # UTF-8 guard forbids. Relax the plausibility constraint, never the guard.
            logits = s.fuser.fuse(s.rows, constrained=False)
            s.guard.apply(logits, s.state)
            if s.penalties is not None:
                s.penalties.apply(logits)
            tok = s.sampler(logits)
            if logits[tok] == -np.inf:
                self._finish(s, "no-valid-token")
                return
        entry = self._logprob(logits, tok, s.gen.spec.logprobs) if s.gen.logprobs is not None else None
        if self.accept(s, tok):
            s.pick = tok
        if entry is not None and not self.engine.vocab.eog[tok]:
            for g in (s.gen, *s.followers):
                if g.logprobs is not None:
                    g.logprobs.append(entry)

    def _logprob(self, logits: np.ndarray, tok: int, top: int | None) -> TokenLogprob:
        """The picked token's log-probability under the fused distribution the sampler saw (penalties
        and the UTF-8 mask applied, at temperature 1, before top-k/top-p/min-p), and the ``top`` most
        likely tokens. Vocabulary-wide numpy passes into the scheduler's scratch rows, no new ones."""
        tmp, mask = self._tmp, self._mask
        m = float(logits.max())
        np.subtract(logits, np.float32(m), out=tmp)
        np.exp(tmp, out=tmp)
        lse = m + float(np.log(tmp.sum(dtype=np.float64)))
        alts: tuple[tuple[int, float], ...] = ()
        if top:
            k = min(top, len(logits))
            tmp[:] = logits
            tmp.partition(len(tmp) - k)
            np.greater_equal(logits, tmp[len(tmp) - k], out=mask)
            ids = np.flatnonzero(mask)
            ids = ids[np.argsort(-logits[ids], kind="stable")][:k]
            alts = tuple((int(t), float(logits[t]) - lse) for t in ids)
        return TokenLogprob(int(tok), float(logits[tok]) - lse, alts)

    def masked_logits(self, s: _Seq, rows: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """The sequence's fused logits of one position with the UTF-8 guard applied (in its row of the
        batch buffer), or None when they are not finite (the sequence then ends with the error)."""
        g = s.gen
        logits = s.fuser.fuse(rows)
        top = logits.max()
        if not np.isfinite(top):
            err = NonFiniteLogitsError(
                f"the fused logits of step {len(g.token_ids) + 1} are not finite ({top}): a model gave NaN or "
                f"infinite logits, or the weights {_weights_text(s.fuser.plan.weights)} are too large "
                "(use weights of a size like those of the paper, in [-1, 1])"
            )
            self._finish(s, "error", err)
            return None
        if self.observer is not None:
            self.observer(g, rows, logits)
        s.guard.apply(logits, s.state)
        return logits

    def accept(self, s: _Seq, tok: int) -> bool:
        """Append ``tok`` to the sequence: advance its guard, stream the characters it completes,
        and check stop strings, end-of-generation, ``max_tokens`` and the context. False when the
        sequence has ended (its cells are freed then)."""
        g = s.gen
        vocab = self.engine.vocab
        if vocab.eog[tok]:
            self._finish(s, "eog")
            return False
        if s.fold is not None:
            self._fold(s, tok)
        if s.penalties is not None:
            s.penalties.push(tok)
        g.token_ids.append(tok)
        for f in s.followers:
            f.token_ids.append(tok)
        s.state = s.guard.advance(s.state, tok)
        s.pending += s.decoder.feed(vocab.pieces[tok])
        if s.stops and s.pending:
            hits = [i for i in (s.pending.find(x) for x in s.stops) if i >= 0]
            if hits:
                self._emit(s, s.pending[: min(hits)])
                s.pending = ""
                s.decoder = StreamDecoder()  # what follows a stop string is never shown
                self._finish(s, "stop")
                return False
            keep = _stop_holdback(s.pending, s.stops)
            if len(s.pending) > keep:
                self._emit(s, s.pending[: len(s.pending) - keep])
                s.pending = s.pending[len(s.pending) - keep :]
        elif s.pending:
            self._emit(s, s.pending)
            s.pending = ""
        if len(g.token_ids) >= g.spec.max_tokens:
            self._finish(s, "length")
            return False
        if s.n_past >= self.engine.n_ctx:
            self._finish(s, "context")
            return False
        return True

    @staticmethod
    def _fold(s: _Seq, tok: int) -> None:
        """A conversation's grid gains the row of the position just decoded, whose next token is ``tok``
        (so the next turn's perplexity selection need not evaluate the reply again)."""
        fold = s.fold
        assert fold is not None and fold.kept is not None
        if fold.kept.n != s.n_past - 1 or not all(r in s.rows for r in SELECTION_ROLES):
            fold.close()  # rows missing (the history moved on without them): the next turn folds from there
            s.fold = None
            return
        r = s.rows
        fold.add(r[LARGE_INS][None, :], r[SMALL_CPT][None, :], r[SMALL_BASE][None, :], np.asarray([tok]))

    @staticmethod
    def _emit(s: _Seq, piece: str) -> None:
        if piece:
            for g in (s.gen, *s.followers):
                g.text += piece
                g._pieces.append(piece)

    def _finish(self, s: _Seq, reason: str, error: BaseException | None = None) -> None:
        """End a sequence: flush its text, free its cells and its sequence id."""
        g = s.gen
        if reason not in ("stop", "error", "cancelled"):
            self._emit(s, s.pending + s.decoder.flush())
        s.pending = ""
        g.finish_reason = reason
        if error is not None:
            g.error = error
        g.timings.gen_tokens = len(g.token_ids)
        g.timings.gen_s = time.perf_counter() - s.started if s.started else 0.0
        for f in s.followers:
            f.finish_reason, f.error = reason, error
            f.timings = replace(g.timings, queued_s=f.timings.queued_s)
        if s in self.active:
            self.active.remove(s)
        if s.fold is not None:
            s.fold.close()
            s.fold = None
        b = s.branch
        own = s.request.session is not None and b.id == s.request.session.id  # a conversation's cells stay
        if s in b.members:
            b.members.remove(s)
            if not b.members and not own:
                for r in b.kv_roles:
                    self.engine.models[r].seq_rm(b.id)
                b.request.spare.append(b.id)
        self.cells_free += s.cells
        req = s.request
        req.running -= 1
        if req.running == 0:
            if self.shared_prompt:
                self.cells_free += len(req.prompt)
            self.free_ids.extend(req.spare)
            req.spare = []
            if req.session is not None:
                self._keep_session(s)
        if s.slot >= 0:
            self._slots.append(s.slot)
            s.slot = -1

    def _fail(self, gens: Sequence[Generation], error: BaseException) -> None:
        for g in gens:
            if g.finish_reason is None:
                g.finish_reason = "error"
                g.error = error
