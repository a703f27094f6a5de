"""The scheduler: fused generation for many sequences at once, one batched step at a time.

Each step reads like the algorithm, for every active sequence at once (:meth:`Scheduler.step`):

1. **admit** waiting requests, as sequence ids and KV cells allow: evaluate each prompt once
   (choosing weights on the way when asked to), share its KV cells with every sequence that
   continues it, and pick each sequence's first token;
2. **decode** the last picked token of every branch that decodes plainly: one ``llama_decode`` per
   model, holding one token of every branch whose sequences use that model;
3. **pick**: every such sequence fuses its rows of logits, masks what would break UTF-8, picks a
   token, turns its bytes into whole characters, checks stop strings, and queues the text for
   whoever reads it (:class:`~trimix_cpp.sequence.SeqState`);
4. **draft**: the sequences that decode speculatively run one round instead: the small models
   draft, the large ones verify the draft in one batch (:mod:`trimix_cpp.speculative`);
5. **regroup**: on each branch, the sequences that picked the same token stay together, and the
   others fork into branches of their own.

A branch is one llama.cpp sequence id: the token history of every sequence that has produced
exactly those tokens so far. A model's logits depend on the tokens alone, so sequences that agree
(the grid pairs of an evaluation often do, for many tokens) decode once between them.

Logits are read where llama.cpp left them (zero-copy views) and consumed within the step that made
them, so nothing vocabulary-sized is copied or allocated per step: the fused rows of the batch live
in one preallocated buffer, a row per sequence.

A :class:`~trimix_cpp.generation.Session` keeps a conversation's tokens in the cache between
requests: the next prompt reuses their longest common prefix and evaluates only the rest (see
:meth:`Scheduler.submit`).
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .errors import ContextOverflowError, TrimixError, WeightError
from .fusion import FusionPlan
from .generation import Generation, SeqSpec, Session, check_draft, check_logprobs, check_max_tokens
from .prefill import PromptPass, evaluate_prompt
from .selection import SELECTION_ROLES, GridRows, Selector
from .sequence import SeqState, Shared
from .speculative import draft_plan, run_round, usable
from .threads import ThreadGovernor

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


def locked(method: Callable) -> Callable:
    """Run ``method`` holding ``self.lock`` (the engine's re-entrant lock): llama.cpp's contexts
    and the scheduler's state must never be used from two threads at once."""

    @functools.wraps(method)
    def run_locked(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)

    return run_locked


class KvCells:
    """The KV cache's bookkeeping: the llama.cpp sequence ids not in use, the cells not reserved, and
    what a request reserves. A request reserves, before it starts, every cell it may fill: each
    sequence's new tokens (at most what the context leaves after the prompt), and the prompt once
    when its sequences share its cells (one unified cache) or once per sequence (a cache each)."""

    def __init__(self, n_seq: int, total: int, n_ctx: int, shared_prompt: bool) -> None:
        self.total = total
        self.free = total
        self.n_ctx = n_ctx
        self.shared_prompt = shared_prompt
        self.ids = list(range(n_seq - 1, -1, -1))  # free sequence ids, the lowest taken first

    def for_seq(self, n_prompt: int, spec: SeqSpec) -> int:
        """Cells one sequence reserves: its new tokens, plus its copy of the prompt when each
        sequence has a cache of its own."""
        n_new = min(spec.max_tokens + spec.draft, self.n_ctx - n_prompt)
        return n_new if self.shared_prompt else n_prompt + n_new

    def for_prompt(self, n_prompt: int) -> int:
        """Cells a request's prompt reserves beside its sequences' (shared by all of them)."""
        return n_prompt if self.shared_prompt else 0

    def for_request(self, n_prompt: int, specs: Sequence[SeqSpec]) -> int:
        return sum(self.for_seq(n_prompt, s) for s in specs) + self.for_prompt(n_prompt)

    def fits(self, n_ids: int, cells: int) -> bool:
        return n_ids <= len(self.ids) and cells <= self.free


@dataclass
class Request:
    """A prompt and the generations that continue it, queued or running."""

    prompt: np.ndarray
    gens: list[Generation]
    cells: int  # KV cells reserved while it runs: the prompt once, plus each sequence's new tokens
    running: int = 0  # its sequences still active; the shared prompt cells go with the last one
    spare: list[int] = field(default_factory=list)  # its llama.cpp sequence ids no branch holds now
    session: Session | None = None

    def needs(self) -> tuple[int, int]:
        """The sequence ids and cells it takes to start, beyond what its conversation holds already."""
        own = self.session
        return len(self.gens) - (own is not None), self.cells - (own.cells if own is not None else 0)


class Branch:
    """One llama.cpp sequence id: a token history shared by every sequence (``members``) that has
    produced exactly those tokens so far, its position in the KV cache, the token to decode next,
    and each model's logits after the last decoded one. When the members' next tokens differ, the
    branch forks: the new branch shares the old one's cells (``seq_cp``: no copy in a shared cache,
    a copy of the parent's cache when each sequence has its own) and goes on with its own tokens."""

    __slots__ = ("id", "kv_roles", "members", "n_past", "next_token", "request", "rows")

    def __init__(self, seq_id: int, n_past: int, kv_roles: tuple[str, ...], request: Request) -> None:
        self.id = seq_id
        self.n_past = n_past  # positions in the KV cache
        self.next_token = -1  # picked, not yet decoded
        self.kv_roles = kv_roles  # models where this sequence id holds cells
        self.request = request
        self.members: list[SeqState] = []
        self.rows: dict[str, np.ndarray] = {}  # each model's logits after the last decoded token

    def roles(self) -> tuple[str, ...]:
        """The models this branch decodes in: those its members use."""
        used = {r for s in self.members for r in s.roles}
        return tuple(r for r in self.kv_roles if r in used)


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


def _check_spec(spec: SeqSpec, models: Mapping[str, LlamaModel]) -> None:
    """A sequence's settings, checked before its request is queued."""
    check_max_tokens(spec.max_tokens)
    check_draft(spec.draft)
    check_logprobs(spec.logprobs)
    spec.sampling.validate()
    if spec.draft and (spec.sampling.penalized or spec.logprobs is not None):
        what = "repetition penalties" if spec.sampling.penalized else "logprobs"
        raise TrimixError(
            "{draft} (speculative decoding) cannot be combined with {what} (use {draft} 0)", param="draft", what=what
        )
    missing = [r for r in spec.roles if r not in models]
    if missing:
        raise WeightError(
            "this method needs the {model} model ({param}), which is not loaded", param=missing[0], model=missing[0]
        )
    if spec.draft and isinstance(spec.fusion, FusionPlan) and draft_plan(spec.fusion) is None:
        raise TrimixError(
            "{draft} lets small models draft for a large one, but {method} {chosen} has no large model or no "
            "small-cpt model (use {draft} 0)",
            param="draft",
            chosen=spec.fusion.method,
        )


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


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
        # whether a request's sequences share its prompt's cells (one unified cache) or each holds
        # a copy (a cache per sequence): the cells a request reserves count the prompt once or per sequence
        self.kv = KvCells(n_seq, kv_cells, engine.n_ctx, shared_prompt)
        self.queue: deque[Request] = deque()
        self.active: list[SeqState] = []
        v = engine.vocab.n_vocab
        self._shared = Shared(
            vocab=engine.vocab,
            n_ctx=engine.n_ctx,
            guard=engine.guard,
            fused=np.empty((n_seq, v), dtype=np.float32),
            scratch=np.empty(v, dtype=np.float32),
            mask=np.empty(v, dtype=bool),
            observe=self._observe,
            release=self._release,
        )
        self._slots = list(range(n_seq))  # rows of the fused buffer not in use
        self.steps = 0
        self.decode_s = 0.0
        # follows what a step costs with every core and with one (trimix_cpp.threads); the engine sets
        # it when the user left the thread count to trimix
        self.governor: ThreadGovernor | None = None
        # called with (generation, per-model rows, fused row) before the guard masks it: for tests
        # and diagnostics that compare the fusion with each model's own logits
        self.observer: Callable[[Generation, Mapping[str, np.ndarray], np.ndarray], None] | None = None

    # the cache's state, as the server's health report and its conversation cache read it
    @property
    def kv_cells(self) -> int:
        return self.kv.total

    @property
    def cells_free(self) -> int:
        return self.kv.free

    @property
    def free_ids(self) -> list[int]:
        return self.kv.ids

    @property
    def idle(self) -> bool:
        return not self.queue and not self.active

    # -- requests ---------------------------------------------------------------------------------

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
                raise TrimixError(
                    "{draft} (speculative decoding) is not available in a conversation (use {draft} 0)", param="draft"
                )
        if len(specs) > self.n_seq:
            raise TrimixError(
                "this request needs {n} sequences but the engine holds {held} (raise {n_seq})",
                param="n_seq",
                n=len(specs),
                held=self.n_seq,
            )
        for spec in specs:
            _check_spec(spec, eng.models)
        eng.check_prompt(prompt)
        cells = self.kv.for_request(len(prompt), specs)
        if cells > self.kv.total:
            raise ContextOverflowError(
                "this request needs {cells} KV cells (a {tokens}-token prompt and {n} sequences) but the cache "
                "holds {total} (raise {n_ctx} or lower {n_seq} or {max_tokens})",
                param="max_tokens",
                cells=cells,
                tokens=len(prompt),
                n=len(specs),
                total=self.kv.total,
            )
        gens = [Generation(self, prompt, spec) for spec in specs]
        self.queue.append(Request(prompt, gens, cells, session=session))
        if session is not None:
            session.busy = True
        return gens

    @locked
    def reap(self) -> None:
        """Drop cancelled generations: queued ones leave the queue, active ones free their sequence."""
        for req in list(self.queue):
            for g in [g for g in req.gens if g.cancelled and g.finish_reason is None]:
                g.finish_reason = "cancelled"
            req.gens = [g for g in req.gens if g.finish_reason is None]
            if not req.gens:
                self.queue.remove(req)
                if req.session is not None:
                    req.session.busy = False
        for s in self.active:
            for f in [f for f in s.followers if f.cancelled]:
                s.followers.remove(f)
                f.finish_reason = "cancelled"
            while s.gen.cancelled and s.followers:  # a follower takes over the sequence
                s.gen.finish_reason = "cancelled"
                s.gen = s.followers.pop(0)
        for s in [s for s in self.active if s.gen.cancelled]:
            s.finish("cancelled")

    @locked
    def run(self, gens: Sequence[Generation]) -> None:
        """Step until every generation in ``gens`` is finished (their text stays readable)."""
        while any(g.finish_reason is None for g in gens):
            self.step()

    # -- conversations ----------------------------------------------------------------------------

    @locked
    def open_session(self) -> Session:
        """A conversation that keeps its tokens in the cache between requests (holds one sequence id)."""
        if not self.kv.ids:
            raise TrimixError(
                "no free sequence for a conversation: all {n} are in use (raise {n_seq} or close one)",
                param="n_seq",
                n=self.n_seq,
            )
        return Session(self, self.kv.ids.pop())

    @locked
    def close_session(self, session: Session) -> None:
        """Free a session's cells and sequence id (its running generation, if any, is cancelled)."""
        if session.closed:
            return
        if session.busy:
            for req in [*self.queue, *(s.branch.request for s in self.active)]:
                if req.session is session:
                    for g in req.gens:
                        g.cancel()
            self.reap()
        self._reset_session(session)
        session.closed = True
        self.kv.ids.append(session.id)

    def _reset_session(self, session: Session) -> None:
        """Forget a session's history and drop its cells."""
        for m in self.engine.models.values():
            m.seq_rm(session.id)
        self.kv.free += session.cells
        session.cells = 0
        session.tokens = np.zeros(0, dtype=np.int32)
        session.held = {}
        session.grid = None
        session.busy = False

    def _keep_session(self, s: SeqState) -> None:
        """After a conversation's request: its prompt and the tokens picked stay in the cache."""
        req = s.branch.request
        session = req.session
        assert session is not None
        if s.gen.finish_reason == "error":
            self._reset_session(session)
            return
        session.tokens = np.concatenate([req.prompt, np.asarray(s.gen.token_ids, dtype=np.int32)])
        for r in s.branch.kv_roles:
            session.held[r] = s.branch.n_past if r in s.roles else len(req.prompt)
        session.cells = max(session.held.values(), default=0)
        self.kv.free -= session.cells
        session.busy = False

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

    # -- the step ---------------------------------------------------------------------------------

    @locked
    def step(self) -> None:
        """Admit what fits, decode every active sequence's last token, pick every next token (or run
        a speculative round), and regroup the branches by the tokens picked."""
        self.reap()
        self._admit()
        if not self.active:
            self._refuse_head()
            return
        self.steps += 1
        plain, drafting = self._split(list(self.active))
        self._decode(plain)
        self._pick(plain)
        self._draft(drafting)
        self._regroup(plain + drafting)

    def _admit(self) -> None:
        """Start queued requests, first come first served, while sequence ids and cells allow."""
        while self.queue:
            req = self.queue[0]
            if not self.kv.fits(*req.needs()):
                return
            self.queue.popleft()
            self._start(req)

    def _refuse_head(self) -> None:
        """Nothing runs and the head of the queue still does not fit: it never will."""
        if self.queue:
            req = self.queue.popleft()
            if req.session is not None:
                req.session.busy = False
            self._fail(req.gens, TrimixError("the request does not fit in the KV cache (raise {n_ctx})", param="n_ctx"))

    def _split(self, batch: list[SeqState]) -> tuple[list[SeqState], list[SeqState]]:
        """The sequences that decode plainly this step, and those that run a speculative round (a
        drafter alone in its branch, with room to draft, and not pausing after fruitless rounds)."""
        n_ctx = self.engine.n_ctx
        drafting = [s for s in batch if len(s.branch.members) == 1 and usable(s, n_ctx) > 0 and s.drafter.ready()]
        return [s for s in batch if s not in drafting], drafting

    def _decode(self, seqs: Sequence[SeqState]) -> None:
        """The pending token of every branch into every model its sequences use, in one decode per model."""
        if not seqs:
            return
        branches = list(dict.fromkeys(s.branch for s in seqs))
        spent = self._timed(seqs, lambda: self._decode_branches(branches))
        if spent is not None and self.governor is not None:
            self.governor.observe(len(branches), spent)

    def _decode_branches(self, branches: Sequence[Branch]) -> None:
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

    @staticmethod
    def _pick(seqs: Sequence[SeqState]) -> None:
        """Every sequence still running picks its next token from its branch's rows."""
        for s in seqs:
            if not s.finished:
                s.advance()

    def _draft(self, seqs: Sequence[SeqState]) -> None:
        """One speculative round for the drafting sequences: draft, verify, undo what was rejected."""
        if seqs:
            self._timed(seqs, lambda: run_round(self.engine, seqs))

    def _regroup(self, seqs: Sequence[SeqState]) -> None:
        """On each branch of ``seqs``, the sequences that picked the same token stay together; the
        others fork (a drafting sequence always gets a branch of its own). Finished sequences have
        already left their branches."""
        for b in dict.fromkeys(s.branch for s in seqs):
            groups: dict[object, list[SeqState]] = {}
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

    def _fork(self, parent: Branch, group: list[SeqState]) -> None:
        """A new branch for ``group``, holding ``parent``'s cells so far (shared, or copied)."""
        req = parent.request
        seq_id = req.spare.pop()
        roles = tuple(r for r in parent.kv_roles if any(r in s.roles for s in group))
        for r in roles:
            self.engine.models[r].seq_cp(parent.id, seq_id)
        child = Branch(seq_id, parent.n_past, roles, req)
        child.members = group
        child.next_token = group[0].pick
        child.rows = parent.rows
        for s in group:
            s.branch = child

    def _timed(self, seqs: Sequence[SeqState], work: Callable[[], None]) -> float | None:
        """Run one decoding pass of ``seqs`` and charge its time inside llama_decode to them. A failed
        llama_decode leaves the batch's cells unusable: its sequences end with the error (None)."""
        before = self._decode_seconds()
        try:
            work()
        except Exception as e:
            for s in seqs:
                if not s.finished:
                    s.finish("error", e)
            return None
        spent = self._decode_seconds() - before
        self.decode_s += spent
        for s in seqs:
            s.gen.timings.decode_s += spent
        return spent

    def _decode_seconds(self) -> float:
        return sum(m.decode_s for m in self.engine.models.values())

    # -- starting and ending sequences ------------------------------------------------------------

    def _start(self, req: Request) -> None:
        """Evaluate the prompt once, choosing weights on the way when asked to; start a sequence for
        each distinct setting on one branch, and pick every sequence's first token."""
        started = time.perf_counter()
        prefilled = self._prefill(req)
        if prefilled is None:
            return
        root, ev = prefilled
        seqs = self._sequences(req, root, ev, started)
        self._pick(seqs)
        self._regroup(seqs)

    def _prefill(self, req: Request) -> tuple[Branch, PromptPass] | None:
        """The prompt in every model the request uses, on its first sequence id (a conversation's
        own, reusing what its cache holds). None when the evaluation failed (the request has ended)."""
        eng = self.engine
        session = req.session
        if session is not None:
            ids = [session.id]
            self.kv.free += session.cells
            session.cells = 0
        else:
            ids = [self.kv.ids.pop() for _ in req.gens]
        self.kv.free -= req.cells
        roles = tuple(r for r in eng.models if any(r in g.spec.roles for g in req.gens))
        selectors = [g.spec.fusion for g in req.gens if isinstance(g.spec.fusion, Selector)]
        root = Branch(ids[0], len(req.prompt), roles, req)
        req.spare = ids[1:]
        held, rows = self._reuse(session, req.prompt, roles, selectors) if session is not None else (None, None)
        try:
            ev = evaluate_prompt(
                eng.models, eng.vocab.n_vocab, req.prompt, ids[0], roles, selectors, held=held, rows=rows
            )
            root.rows = {r: eng.models[r].logits_row(-1) for r in roles}
        except Exception as e:
            self.kv.free += req.cells
            if session is not None:
                self._reset_session(session)
            else:
                for m in eng.models.values():
                    m.seq_rm(ids[0])
                self.kv.ids.extend(ids)
            self._fail(req.gens, e)
            return None
        if session is not None:
            session.tokens = req.prompt
            session.held.update({r: len(req.prompt) for r in roles})
        return root, ev

    def _sequences(self, req: Request, root: Branch, ev: PromptPass, started: float) -> list[SeqState]:
        """A sequence on ``root`` for each generation of the request, or, when an earlier one has the
        very same weights and settings (hence the same tokens), a follower of that one."""
        seqs: dict[tuple, SeqState] = {}
        for g in req.gens:
            g.timings.queued_s = started - g.submitted
            g.timings.prompt_s = ev.seconds
            g.timings.cached_tokens = len(req.prompt) - ev.evaluated
            if isinstance(g.spec.fusion, Selector):
                g.selection = ev.selections[g.spec.fusion]
                g.fusion = g.selection.plan()
            fusion = g.fusion
            assert isinstance(fusion, FusionPlan)
            key = _same_output_key(g.spec, fusion)
            leader = seqs.get(key)
            if leader is not None:
                leader.followers.append(g)
                self.kv.ids.append(req.spare.pop())
                self.kv.free += self.kv.for_seq(len(req.prompt), g.spec)
                continue
            fold = None
            if ev.kept is not None and all(r in fusion.roles for r in SELECTION_ROLES):
                fold, ev.kept = ev.kept, None
            s = SeqState(g, fusion, root, self._slots.pop(), self._shared, req.prompt, fold)
            seqs[key] = s
            root.members.append(s)
            self.active.append(s)
        if ev.kept is not None:
            ev.kept.close()
        req.running = len(seqs)
        return list(seqs.values())

    def _release(self, s: SeqState) -> None:
        """A sequence has ended: it leaves the batch and its branch (whose cells go when it empties,
        unless a conversation keeps them), and its cells, sequence id and fused row are free again."""
        if s in self.active:
            self.active.remove(s)
        b = s.branch
        req = b.request
        own = req.session is not None and b.id == req.session.id  # a conversation's cells stay
        if s in b.members:
            b.members.remove(s)
            if not b.members and not own:
                for r in b.kv_roles:
                    self.engine.models[r].seq_rm(b.id)
                req.spare.append(b.id)
        self.kv.free += self.kv.for_seq(len(req.prompt), s.gen.spec)
        req.running -= 1
        if req.running == 0:
            self.kv.free += self.kv.for_prompt(len(req.prompt))
            self.kv.ids.extend(req.spare)
            req.spare = []
            if req.session is not None:
                self._keep_session(s)
        self._slots.append(s.slot)

    def _observe(self, gen: Generation, rows: Mapping[str, np.ndarray], fused: np.ndarray) -> None:
        if self.observer is not None:
            self.observer(gen, rows, fused)

    @staticmethod
    def _fail(gens: Sequence[Generation], error: BaseException) -> None:
        for g in gens:
            if g.finish_reason is None:
                g.finish_reason = "error"
                g.error = error
