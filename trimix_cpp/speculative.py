"""Speculative fused decoding: the small models draft, the large model checks the draft in one batch.

TriMix's chosen weights put most of the mass on the small continued model (the paper's Table 5:
alpha around 0.1-0.3, beta 0.7-1.0), so the small models alone predict the fused choice most of
the time. Each round, for every sequence that drafts:

1. **Draft.** The small models decode the sequence's pending token and then up to ``k`` drafted
   tokens, one small decode per token. The drafter's logits are the plan's own small-model terms
   with the large models' weight moved onto small-cpt (:func:`draft_plan`), masked by the same
   UTF-8 guard. Drafting stops early when the drafter is unsure (its top probability below
   :data:`UNSURE`), at end-of-generation, at the first character of a stop string, or where
   ``max_tokens`` or the context would end. The small models' logits of every drafted position are
   kept: the fused distribution needs them again. The draft length adapts per sequence
   (:meth:`Drafter.update`): it grows while drafts are accepted whole and shrinks to what was
   accepted; after a round whose first drafted token is rejected the sequence decodes plainly for
   a while, longer after each further fruitless round.
2. **Verify.** The large model(s) decode the pending token and the draft in one batch, with logits
   at every position. At each position the fused logits combine them with the kept small rows.
   Greedy: drafted tokens are accepted while they equal the fused argmax; the first mismatch is
   replaced by the fused argmax, and a fully accepted draft earns one bonus token. Sampling: a
   drafted token x is accepted with probability min(1, p(x)/q(x)); otherwise the token is drawn from
   the normalised max(0, p - q). p and q are the distributions after temperature, top-k/p, min-p
   and the guard, so the output distribution is exactly the fused one.
3. **Undo.** Positions after the last accepted token are removed from every model's KV cache.

Accepted tokens go through the sequence's ordinary path one at a time (guard state, streaming
decoder, stop strings), so nothing is shown before it is accepted, and a draft that crosses a stop
string, end-of-generation or ``max_tokens`` ends exactly where plain decoding ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from .fusion import LARGE_BASE, LARGE_INS, SMALL_CPT, Fuser, FusionPlan
from .sampling import SamplingParams, TokenSampler

if TYPE_CHECKING:
    from .scheduler import Models
    from .sequence import SeqState
    from .vocab import SharedVocab


LARGE_ROLES = (LARGE_INS, LARGE_BASE)
# Stop drafting when the drafter's most likely token has less probability than this.
UNSURE = 0.3
MAX_DRAFT = 16
# After a round whose first drafted token is rejected, the sequence decodes plainly for this many
# steps before it drafts again, doubling on every further fruitless round up to MAX_PAUSE: on a
# CPU a batch of two tokens through the large model costs about two single decodes, so a round
# that gains nothing costs almost twice a plain step.
MAX_PAUSE = 64


def draft_plan(fusion: FusionPlan) -> FusionPlan | None:
    """The drafter of a plan: its small-model terms, with every large model's weight moved onto
    small-cpt (the small model closest to the large one's job). None when the plan has no large
    model to save or no small model to draft with, or a plausibility constraint (Contrastive
    Decoding uses only small models)."""
    large = [r for r in fusion.weights if r in LARGE_ROLES]
    small = {r: w for r, w in fusion.weights.items() if r not in LARGE_ROLES}
    if not large or SMALL_CPT not in fusion.roles or fusion.plausibility_role is not None:
        return None
    moved = sum(fusion.weights[r] for r in large)
    small[SMALL_CPT] = small.get(SMALL_CPT, 0.0) + moved
    return FusionPlan("draft", small)


class Drafter:
    """One sequence's drafting state: its drafter, the kept small-model rows of the round, and the
    draft distributions (sampling)."""

    def __init__(self, fusion: FusionPlan, k: int, sampling: SamplingParams, n_vocab: int) -> None:
        plan = draft_plan(fusion)
        assert plan is not None
        self.k = k
        self.plan = plan
        self.small_roles = tuple(r for r in fusion.roles if r not in LARGE_ROLES)
        self.large_roles = tuple(r for r in fusion.roles if r in LARGE_ROLES)
        self.rows = {r: np.empty((k + 1, n_vocab), dtype=np.float32) for r in self.small_roles}
        self.fuser = Fuser(plan, n_vocab)
        self.greedy = sampling.greedy
        self.q = None if self.greedy else np.empty((k, n_vocab), dtype=np.float32)
        # The draft's own random stream: the acceptance test and the residual draw use the
        # sequence's sampler, so the drafter never shifts them.
        draft_seed = (sampling.seed * 7919 + 17) % 2**64
        self.sampler = None if self.greedy else TokenSampler(replace(sampling, seed=draft_seed), n_vocab)
        self.tokens: list[int] = []  # the pending token, then the drafted ones
        self.state = 0
        self.drafting = False
        self.limit = 0
        self.drafted = 0
        self.accepted = 0
        self.k_now = k  # this round's draft length: grows while drafts are accepted whole
        self.pause = 0  # plain steps left before the next round
        self.backoff = 1  # the pause after the next fruitless round

    def ready(self) -> bool:
        """Whether this step is a drafting round (False while pausing after fruitless rounds)."""
        if self.pause > 0:
            self.pause -= 1
            return False
        return True

    def update(self, drafted: int, accepted: int) -> None:
        """Adapt the draft length to what the verifier accepted this round.

        Only the amount of drafting changes, never which token is chosen, so the output stays
        exactly that of plain decoding (greedy) or its distribution (sampling).
        """
        if drafted == 0:
            return
        if accepted == drafted:
            self.k_now = min(self.k, self.k_now + 2)
            self.backoff = 1
        elif accepted == 0:
            self.k_now = 1
            self.pause = self.backoff
            self.backoff = min(MAX_PAUSE, 2 * self.backoff)
        else:
            self.k_now = max(1, min(self.k_now - 1, accepted + 1))
            self.backoff = 1


def usable(s: SeqState, n_ctx: int) -> int:
    """How many tokens this sequence may draft this round (0: decode it plainly)."""
    d: Drafter | None = s.drafter
    if d is None:
        return 0
    g = s.gen
    left = g.spec.max_tokens - len(g.token_ids) - 1  # the round also yields one verified token
    room = n_ctx - s.branch.n_past - 1  # positions p .. p+k must fit
    return max(0, min(d.k_now, left, room))


def run_round(eng: Models, seqs: Sequence[SeqState]) -> None:
    """One speculative round for every sequence in ``seqs`` (each alone in its branch, with a
    pending token). Each one's tokens go through the sequence's own path (:meth:`SeqState.accept`);
    its next pending token is left in ``pick``."""
    vocab = eng.vocab
    n = vocab.n_vocab
    starts = {id(s): s.branch.n_past for s in seqs}
    for s in seqs:
        d = s.drafter
        d.tokens = [s.branch.next_token]
        d.state = s.state
        d.limit = usable(s, eng.n_ctx)
        d.drafting = True
    # 1. draft: one small decode per drafted token, every drafting sequence together
    j = 0
    while True:
        live = [s for s in seqs if s.drafter.drafting]
        if not live:
            break
        for role in eng.models:
            users = [s for s in live if role in s.drafter.small_roles]
            if not users:
                continue
            m = eng.models[role]
            tokens = np.fromiter((s.drafter.tokens[-1] for s in users), dtype=np.int32, count=len(users))
            pos = np.fromiter((starts[id(s)] + j for s in users), dtype=np.int32, count=len(users))
            ids = np.fromiter((s.branch.id for s in users), dtype=np.int32, count=len(users))
            m.decode_batch(tokens, pos, ids, 1)
            rows = m.logits_rows(len(users))
            for k, s in enumerate(users):
                s.drafter.rows[role][j] = rows[k][:n]
        for s in live:
            d = s.drafter
            if len(d.tokens) - 1 >= d.limit:
                d.drafting = False
                continue
            tok = _draft_one(d, s, j, vocab)
            if tok is None:
                d.drafting = False
            else:
                d.tokens.append(tok)
        j += 1
    # 2. verify: the pending token and the draft through the large model(s), all outputs
    large_rows: dict[int, dict[str, np.ndarray]] = {id(s): {} for s in seqs}
    for role in eng.models:
        users = [s for s in seqs if role in s.drafter.large_roles]
        if not users:
            continue
        m = eng.models[role]
        lengths = [len(s.drafter.tokens) for s in users]
        tokens = np.concatenate([np.asarray(s.drafter.tokens, dtype=np.int32) for s in users])
        pos = np.concatenate([np.arange(starts[id(s)], starts[id(s)] + len(s.drafter.tokens)) for s in users])
        ids = np.repeat(np.asarray([s.branch.id for s in users], dtype=np.int32), lengths)
        m.decode_batch(tokens, pos.astype(np.int32), ids, 1)
        rows = m.logits_rows(int(sum(lengths)))
        off = 0
        for s, length in zip(users, lengths):
            large_rows[id(s)][role] = rows[off : off + length]
            off += length
        # every sequence's rows are read before this model decodes again (next round)
    for s in seqs:
        d = s.drafter
        before = d.accepted
        _verify(eng, s, starts[id(s)], large_rows[id(s)])
        d.update(len(d.tokens) - 1, d.accepted - before)


def _draft_one(d: Drafter, s: SeqState, j: int, vocab: SharedVocab) -> int | None:
    """The drafter's next token after position j of the round, or None to stop drafting."""
    logits = d.fuser.fuse({r: d.rows[r][j] for r in d.small_roles})
    if not np.isfinite(logits.max()):
        return None
    s.guard.apply(logits, d.state)
    if d.greedy:
        tok = int(np.argmax(logits))
        top = logits[tok]
        if top == -np.inf:
            return None
        # probability of the top token: 1 / sum(exp(l - top))
        np.subtract(logits, top, out=logits)
        np.exp(logits, out=logits)
        if 1.0 / float(logits.sum(dtype=np.float64)) < UNSURE:
            return None
    else:
        q = d.sampler.distribution(logits)
        if not np.isfinite(q).all() or float(q.max()) < UNSURE:
            return None
        d.q[j] = q
        tok = d.sampler.draw(q)
    if vocab.eog[tok] or s.stops.touches(vocab.pieces[tok]):
        return None
    d.state = s.guard.advance(d.state, tok)
    d.drafted += 1
    s.gen.timings.draft_tokens += 1
    return tok


def _verify(eng: Models, s: SeqState, p: int, large: dict[str, np.ndarray]) -> None:
    """Accept the longest agreeing prefix of the draft, then one corrected or bonus token."""
    d = s.drafter
    drafted = d.tokens[1:]
    for j in range(len(drafted) + 1):
        rows = {r: large[r][j] for r in d.large_roles} | {r: d.rows[r][j] for r in d.small_roles}
        logits = s.logits(rows)
        if logits is None:
            return  # finished with an error
        s.branch.n_past = p + j + 1  # the pending token and j drafted ones are in the cache
        if j < len(drafted):
            x = drafted[j]
            if d.greedy:
                y = int(np.argmax(logits))
                ok = y == x
            else:
                probs = s.sampler.distribution(logits)
                ok = s.sampler.rng.random() * float(d.q[j][x]) < float(probs[x])
                if not ok:
                    resid = np.subtract(probs, d.q[j], out=s.scratch)
                    np.maximum(resid, 0.0, out=resid)
                    y = s.sampler.draw(resid if resid.sum(dtype=np.float64) > 0 else probs)
            if ok:
                d.accepted += 1
                s.gen.timings.accepted_tokens += 1
                if not s.accept(x):
                    return
                continue
        else:
            y = int(np.argmax(logits)) if d.greedy else s.sampler.draw(s.sampler.distribution(logits))
        # the corrected (or bonus) token: pending, decoded at the start of the next round
        for r in (*d.large_roles, *d.small_roles):
            eng.models[r].seq_rm(s.branch.id, p + j + 1, -1)
        if logits[y] == -np.inf:
            s.finish("no-valid-token")
            return
        s.choose(y)
        return
