"""One active sequence: from its rows of logits to its next token, and from its tokens to its text.

Every step, for each sequence (:meth:`SeqState.advance`):

1. **fuse** its rows of logits with its weights, into its row of the batch's fused buffer, and check
   that they are finite;
2. **guard**: mask every token that would break UTF-8 after the bytes so far;
3. **sample**: apply the repetition penalties and pick a token (greedy or seeded sampling); when
   Contrastive Decoding's plausibility set and the guard together leave nothing, fuse again
   without the plausibility constraint (never without the guard);
4. **accept** it (:meth:`SeqState.accept`): the guard state advances, the bytes become whole
   characters, the :class:`StopMatcher` holds back what could still start a stop string, and the
   text goes to the generation and to those that follow it; end-of-generation, a stop string,
   ``max_tokens`` or the end of the context end the sequence (:meth:`SeqState.finish`).

Each sequence owns its sampler (seeded), its guard state, its penalties window and its stop
matcher, so no sequence can change another's output. Speculative decoding uses the same
:meth:`~SeqState.logits`, :meth:`~SeqState.accept` and :meth:`~SeqState.finish` for the tokens it
verifies, so a drafted token is shown only once accepted and ends a sequence exactly where plain
decoding would.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from .fusion import LARGE_INS, SMALL_BASE, SMALL_CPT, Fuser, FusionPlan
from .generation import NonFiniteLogitsError, TokenLogprob
from .sampling import Penalties, TokenSampler, greedy
from .selection import SELECTION_ROLES, GridNLL
from .speculative import Drafter, draft_plan
from .utf8 import ACCEPT, StreamDecoder

if TYPE_CHECKING:
    from .generation import Generation
    from .scheduler import Branch
    from .utf8 import Utf8Guard
    from .vocab import SharedVocab


class StopMatcher:
    """Bytes in, text that is safe to show out: whole characters, and nothing that could still turn
    out to be the start of a stop string. What follows a stop string is never shown."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._decoder = StreamDecoder()
        self._held = ""  # decoded text held back: it may be the start of a stop string

    def feed(self, piece: bytes) -> tuple[str, bool]:
        """The text ``piece`` lets through, and whether a stop string was reached (the text then
        ends where the stop string starts)."""
        text = self._held + self._decoder.feed(piece)
        if not self.stops:
            self._held = ""
            return text, False
        hits = [i for i in (text.find(x) for x in self.stops) if i >= 0]
        if hits:
            self._held = ""
            self._decoder = StreamDecoder()
            return text[: min(hits)], True
        keep = _holdback(text, self.stops)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The text still held back, at the end of the sequence."""
        text = self._held + self._decoder.flush()
        self._held = ""
        return text

    def touches(self, piece: bytes) -> bool:
        """Whether ``piece`` holds the first character of a stop string (a draft ends there:
        accepting past a stop would be wasted)."""
        if not self.stops or not piece:
            return False
        text = piece.decode("utf-8", errors="ignore")
        return any(x[0] in text for x in self.stops)


def _holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could still become the start of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


@dataclass(frozen=True)
class Shared:
    """What every sequence of one scheduler shares: the vocabulary and its UTF-8 guard tables, the
    context length, the batch's fused rows (one per slot) and scratch rows, and the scheduler's two
    hooks: ``observe`` sees each fused row before the guard masks it, ``release`` takes back a
    finished sequence's cells, sequence id and slot."""

    vocab: SharedVocab
    n_ctx: int
    guard: Callable[[bool], Utf8Guard]
    fused: np.ndarray
    scratch: np.ndarray
    mask: np.ndarray
    observe: Callable[[Generation, Mapping[str, np.ndarray], np.ndarray], None]
    release: Callable[[SeqState], None]


class SeqState:
    """The state of one active sequence, complete from its construction: its weights (fuser), sampler,
    penalties, UTF-8 guard state, stop matcher and drafter, the generations it writes to (its own and
    those of requests with the very same settings, ``followers``), and the branch (llama.cpp sequence)
    that holds its tokens."""

    __slots__ = (
        "branch",
        "drafter",
        "finished",
        "fold",
        "followers",
        "fuser",
        "gen",
        "guard",
        "penalties",
        "pick",
        "roles",
        "sampler",
        "shared",
        "slot",
        "started",
        "state",
        "stops",
    )

    def __init__(
        self,
        gen: Generation,
        fusion: FusionPlan,
        branch: Branch,
        slot: int,
        shared: Shared,
        prompt: np.ndarray,
        fold: GridNLL | None = None,
    ) -> None:
        spec = gen.spec
        n_vocab = shared.vocab.n_vocab
        self.gen = gen
        self.followers: list[Generation] = []
        self.branch = branch
        self.slot = slot  # this sequence's row of the batch's fused buffer
        self.shared = shared
        self.roles = fusion.roles
        self.fuser = Fuser(fusion, n_vocab, shared.fused[slot], shared.scratch, shared.mask)
        self.sampler = greedy if spec.sampling.greedy else TokenSampler(spec.sampling, n_vocab)
        self.penalties = Penalties(spec.sampling, shared.n_ctx, prompt) if spec.sampling.penalized else None
        self.guard = shared.guard(spec.utf8_guard)
        self.state = ACCEPT  # the guard's state after the bytes so far
        self.stops = StopMatcher(spec.stop)
        drafts = spec.draft and draft_plan(fusion) is not None
        self.drafter = Drafter(fusion, spec.draft, spec.sampling, n_vocab) if drafts else None
        self.fold = fold  # a conversation's grid rows, extended by every token picked
        self.pick = -1  # the token chosen this step, not yet decoded (-1: none)
        self.finished = False
        self.started = time.perf_counter()

    @property
    def scratch(self) -> np.ndarray:
        """A vocabulary-sized scratch row, free between the calls of this sequence's methods."""
        return self.shared.scratch

    def advance(self) -> None:
        """Pick the next token from the rows of the last decoded position, accept it, and keep it in
        ``pick`` for the next decode (-1 when the sequence has ended)."""
        self.pick = -1
        g = self.gen
        if len(g.token_ids) >= g.spec.max_tokens:
            self.finish("length")
            return
        rows = self.branch.rows
        logits = self.logits(rows)
        if logits is None:
            return
        tok, logits = self._sample(rows, logits)
        if logits[tok] == -np.inf:
            self.finish("no-valid-token")
            return
        entry = self._logprob(logits, tok, g.spec.logprobs) if g.logprobs is not None else None
        self.choose(tok)
        if entry is not None and not self.shared.vocab.eog[tok]:
            for x in (g, *self.followers):
                if x.logprobs is not None:
                    x.logprobs.append(entry)

    def logits(self, rows: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """The fused logits of one position with the UTF-8 guard applied (in this sequence's row of
        the batch buffer), or None when they are not finite (the sequence then ends with the error)."""
        logits = self.fuser.fuse(rows)
        top = logits.max()
        if not np.isfinite(top):
            err = NonFiniteLogitsError(
                f"the fused logits of step {len(self.gen.token_ids) + 1} are not finite ({top}): a model gave NaN or "
                f"infinite logits, or the weights {_weights_text(self.fuser.plan.weights)} are too large "
                "(use weights of a size like those of the paper, in [-1, 1])"
            )
            self.finish("error", err)
            return None
        self.shared.observe(self.gen, rows, logits)
        self.guard.apply(logits, self.state)
        return logits

    def _sample(self, rows: Mapping[str, np.ndarray], logits: np.ndarray) -> tuple[int, np.ndarray]:
        """A token from the guarded logits, and the logits it was drawn from (-inf at it: nothing valid)."""
        if self.penalties is not None:
            self.penalties.apply(logits)
        tok = self.sampler(logits)
        if logits[tok] == -np.inf:
            # Every token was masked: Contrastive Decoding's plausibility set held only tokens the
            # UTF-8 guard forbids. Relax the plausibility constraint, never the guard.
            logits = self.fuser.fuse(rows, constrained=False)
            self.guard.apply(logits, self.state)
            if self.penalties is not None:
                self.penalties.apply(logits)
            tok = self.sampler(logits)
        return tok, logits

    def _logprob(self, logits: np.ndarray, tok: int, top: int | None) -> TokenLogprob:
        """The picked token's log-probability under the fused distribution the sampler saw (penalties
        and the UTF-8 mask applied, at temperature 1, before top-k/top-p/min-p), and the ``top`` most
        likely tokens. Vocabulary-wide numpy passes into the shared scratch rows, no new ones."""
        tmp, mask = self.shared.scratch, self.shared.mask
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

    def choose(self, tok: int) -> None:
        """Accept ``tok`` as the token to decode next (into ``pick``; -1 when it ended the sequence)."""
        self.pick = tok if self.accept(tok) else -1

    def accept(self, tok: int) -> bool:
        """Append ``tok`` to the sequence: advance its guard, stream the characters it completes,
        and check stop strings, end-of-generation, ``max_tokens`` and the context. False when the
        sequence has ended."""
        vocab = self.shared.vocab
        if vocab.eog[tok]:
            self.finish("eog")
            return False
        if self.fold is not None:
            self._fold(tok)
        if self.penalties is not None:
            self.penalties.push(tok)
        g = self.gen
        g.token_ids.append(tok)
        for f in self.followers:
            f.token_ids.append(tok)
        self.state = self.guard.advance(self.state, tok)
        text, stopped = self.stops.feed(vocab.pieces[tok])
        self._emit(text)
        if stopped:
            self.finish("stop")
            return False
        if len(g.token_ids) >= g.spec.max_tokens:
            self.finish("length")
            return False
        if self.branch.n_past >= self.shared.n_ctx:
            self.finish("context")
            return False
        return True

    def _fold(self, tok: int) -> None:
        """A conversation's grid gains the row of the position just decoded, whose next token is ``tok``
        (so the next turn's perplexity selection need not evaluate the reply again)."""
        fold = self.fold
        r = self.branch.rows
        assert fold is not None and fold.kept is not None
        if fold.kept.n != self.branch.n_past - 1 or not all(role in r for role in SELECTION_ROLES):
            fold.close()  # rows missing (the history moved on without them): the next turn folds from there
            self.fold = None
            return
        fold.add(r[LARGE_INS][None, :], r[SMALL_CPT][None, :], r[SMALL_BASE][None, :], np.asarray([tok]))

    def _emit(self, piece: str) -> None:
        if piece:
            self.gen.emit(piece)
            for f in self.followers:
                f.emit(piece)

    def finish(self, reason: str, error: BaseException | None = None) -> None:
        """End the sequence: flush its text (unless a stop string, an error or a cancel ended it),
        record why and its timings on every generation it writes to, and hand its cells back."""
        g = self.gen
        tail = self.stops.flush()
        if reason not in ("stop", "error", "cancelled"):
            self._emit(tail)
        g.finish_reason = reason
        if error is not None:
            g.error = error
        g.timings.gen_tokens = len(g.token_ids)
        g.timings.gen_s = time.perf_counter() - self.started
        for f in self.followers:
            f.finish_reason, f.error = reason, error
            f.timings = replace(g.timings, queued_s=f.timings.queued_s)
        if self.fold is not None:
            self.fold.close()
            self.fold = None
        self.finished = True
        self.shared.release(self)


def _weights_text(weights: Mapping[str, float]) -> str:
    return ", ".join(f"{r}={w:g}" for r, w in weights.items())
