"""The engine: a set of models by role, and everything one does with them.

An :class:`Engine` loads the models (:mod:`~trimix_cpp.loading`), and offers:

* :meth:`Engine.generate` and :meth:`Engine.generate_batch`: fused generation, many sequences
  decoding side by side (:mod:`~trimix_cpp.generation`);
* :meth:`Engine.select`: TriMix's label-free weight choice on a prompt (:mod:`~trimix_cpp.selection`);
* :meth:`Engine.perplexity` and :meth:`Engine.option_nlls`: scoring text under several methods from
  one evaluation per model (:mod:`~trimix_cpp.prefill`).

Generation runs through the engine's scheduler on sequences ``0 .. n_seq-1``; the scoring calls
use one more sequence of their own, so they can run between the steps of unfinished generations
without disturbing them.

Threads: an Engine may be shared between threads. Every call that touches llama.cpp holds the
engine's re-entrant lock (``engine.lock``), so calls from two threads run one after the other,
never at once (llama.cpp's contexts are not thread-safe). Two threads may each iterate their own
generation: whichever steps the scheduler advances every active sequence, and each reads its own
text. The lock serialises; it adds no parallelism (``--parallel`` sequences already decode together).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from . import _llama
from .errors import ContextOverflowError, TrimixError, WeightError
from .fusion import LARGE_INS, FusionPlan
from .generation import Generation, SeqSpec, Session, Timings, check_max_tokens
from .loading import SCORING_SEQS, LoadOptions, build_shared_vocab, load_models
from .prefill import ChunkCallback, evaluate, evaluate_prompt, option_nlls, perplexity, scoring_roles
from .sampling import SamplingParams
from .scheduler import Scheduler, locked
from .scoring import MethodScore
from .selection import DEFAULT_MAX_LOGITS_MIB, SELECTION_ROLES, GridScores, Selection, Selector
from .threads import ThreadGovernor
from .utf8 import Utf8Guard

__all__ = [
    "Engine",
    "Generation",
    "LoadOptions",
    "SeqSpec",
    "Session",
    "Timings",
    "build_shared_vocab",
    "check_max_tokens",
]


class Engine:
    """A set of models, one per role, that share a vocabulary; the context manager frees them.

    Safe to share between threads: calls that touch llama.cpp take turns on ``self.lock`` (see the
    module docstring).
    """

    def __init__(self, paths: Mapping[str, str | Path], options: LoadOptions | None = None) -> None:
        self.lock = threading.RLock()
        self.options = options or LoadOptions()
        self.models, self.vocab = load_models(paths, self.options, extra_seqs=SCORING_SEQS)
        # The prompt is tokenized once, by the large instruction model when there is one: its
        # metadata decides whether a BOS token goes first, and the same ids go to every model.
        self.reference_role = LARGE_INS if LARGE_INS in self.models else next(iter(self.models))
        self.n_ctx = min(m.n_ctx for m in self.models.values())
        self._guards: dict[bool, Utf8Guard] = {}
        self._scratch_seq = self.options.n_seq  # the scoring calls' own sequence
        if self.options.isolated:  # a cache per sequence: each sequence holds a copy of its prompt
            self.scheduler = Scheduler(self, self.options.n_seq, self.options.n_seq * self.n_ctx, shared_prompt=False)
        else:
            kv_cells = min(m.kv_cells for m in self.models.values())
            self.scheduler = Scheduler(self, self.options.n_seq, kv_cells)
        if self.options.n_threads is None:  # the count is trimix's to choose: follow what a step costs
            self.scheduler.governor = ThreadGovernor(self.set_threads, _llama.default_threads())

    # -- lifetime ---------------------------------------------------------------------------------

    @locked
    def close(self) -> None:
        sched = getattr(self, "scheduler", None)
        if sched is not None:
            for s in list(sched.active):
                s.gen.cancel()
            for req in sched.queue:
                for g in req.gens:
                    g.cancel()
            if self.models:
                sched.reap()
        for m in getattr(self, "models", {}).values():
            m.close()
        self.models = {}

    @locked
    def set_threads(self, n_threads: int) -> None:
        """Every model computes with ``n_threads`` threads from the next decode on (0: every core)."""
        self._check_open()
        for m in self.models.values():
            m.set_threads(n_threads)

    @property
    def closed(self) -> bool:
        return not self.models

    def _check_open(self) -> None:
        if not self.models:
            raise TrimixError("this Engine is closed (open a new one: with tm.Engine(paths) as engine: ...)")

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- prompt -----------------------------------------------------------------------------------

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.models)

    @locked
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
                "the prompt is {n} tokens but the context holds {held} (raise {n_ctx} or shorten the prompt)",
                param="n_ctx",
                n=len(tokens),
                held=self.n_ctx,
            )

    def _as_tokens(self, prompt: str | Sequence[int] | np.ndarray) -> np.ndarray:
        if isinstance(prompt, str):
            return self.tokenize(prompt)
        return np.asarray(prompt, dtype=np.int32)

    def _need(self, roles: Sequence[str], what: str) -> None:
        self._check_open()
        missing = [r for r in roles if r not in self.models]
        if missing:
            raise WeightError(
                "{what} needs the {model} model ({param}), which is not loaded",
                param=missing[0],
                what=what,
                model=missing[0],
            )

    @locked
    def guard(self, enabled: bool) -> Utf8Guard:
        """The UTF-8 guard tables (built once per engine and setting: they cost a vocabulary pass)."""
        if enabled not in self._guards:
            v = self.vocab
            self._guards[enabled] = Utf8Guard(v.pieces, v.banned, v.eog, enabled=enabled)
        return self._guards[enabled]

    # -- scoring (on the engine's own sequence) ---------------------------------------------------

    def _fresh_scratch(self) -> int:
        """The scoring sequence, emptied (an :meth:`evaluate_prompt` leaves its cells for the caller)."""
        for m in self.models.values():
            m.seq_rm(self._scratch_seq)
        return self._scratch_seq

    @locked
    def evaluate_prompt(
        self,
        tokens: np.ndarray,
        roles: Sequence[str] | None = None,
        on_chunk: ChunkCallback | None = None,
        chunk_rows: int | None = None,
    ) -> None:
        """Evaluate ``tokens`` in the models of ``roles`` on the engine's scoring sequence (emptied
        first), for tests and benchmarks that read the logits afterwards (see :func:`prefill.evaluate`)."""
        self._check_open()
        self.check_prompt(tokens)
        roles = tuple(roles or self.roles)
        self._need(roles, "this evaluation")
        seq = self._scratch_seq
        used = {r: self.models[r] for r in roles}
        for m in self.models.values():
            m.seq_rm(seq)
        fold = roles if on_chunk is not None else ()
        toks = np.asarray(tokens, dtype=np.int32)
        evaluate(used, toks, seq, fold_roles=fold, on_chunk=on_chunk, chunk_rows=chunk_rows)

    def select(self, prompt: str | Sequence[int] | np.ndarray, selector: Selector) -> Selection:
        """Score the grid of (alpha, beta) on the prompt and choose a pair, without labels.

        The prompt is evaluated exactly once per model. A one-token prompt has no perplexity: a
        ``ppl`` selector then chooses by entropy, and the selection's ``note`` says so.
        """
        return self.select_many(prompt, [selector])[selector]

    @locked
    def select_many(
        self, prompt: str | Sequence[int] | np.ndarray, selectors: Sequence[Selector]
    ) -> dict[Selector, Selection]:
        """Several selections (say PPL and ENT) from one evaluation of the prompt."""
        self._need(SELECTION_ROLES, "weight selection")
        tokens = self._as_tokens(prompt)
        self.check_prompt(tokens)
        seq = self._fresh_scratch()
        try:
            ev = evaluate_prompt(self.models, self.vocab.n_vocab, tokens, seq, SELECTION_ROLES, selectors)
        finally:
            for m in self.models.values():
                m.seq_rm(seq)
        return ev.selections

    @locked
    def perplexity(
        self,
        text: str,
        plans: Mapping[str, FusionPlan],
        *,
        window: int | None = None,
        max_logits_mib: float = DEFAULT_MAX_LOGITS_MIB,
        grid: Selector | None = None,
    ) -> tuple[dict[str, MethodScore], GridScores | None]:
        """NLL of ``text`` under every plan (and, with ``grid``, every pair of a TriMix grid).

        Each model evaluates each window of the text once; all methods are scored from the same
        logits. Windows of ``window`` tokens (default: the context) overlap by half.
        """
        self._need(sorted(scoring_roles(plans.values(), grid is not None)), "scoring")
        ref = self.models[self.reference_role]
        tokens = ref.tokenize(text, add_bos=False)
        bos = [ref.bos_id] if ref.add_bos else []
        return perplexity(
            self.models,
            self.vocab.n_vocab,
            tokens,
            bos,
            self._scratch_seq,
            self.n_ctx,
            plans,
            window,
            max_logits_mib,
            grid,
        )

    @locked
    def option_nlls(
        self,
        prompt: str | np.ndarray,
        options: Sequence[str],
        plans: Mapping[str, FusionPlan | Selector],
    ) -> tuple[dict[str, list[float]], dict[str, Selection]]:
        """Mean NLL per token of each option after the prompt under every plan (multiple choice by
        likelihood), from one evaluation of the prompt; selectors choose their pair on it."""
        self._need(sorted(scoring_roles(plans.values())), "scoring")
        head = self._as_tokens(prompt)
        self.check_prompt(head)
        ref = self.models[self.reference_role]
        tails = [ref.tokenize(o, add_bos=False) for o in options]
        return option_nlls(self.models, self.vocab.n_vocab, head, tails, self._scratch_seq, self.n_ctx, plans)

    def continuation_nll(self, prompt: str | np.ndarray, continuation: str, fusion: FusionPlan) -> float:
        """Mean NLL per token of ``continuation`` after ``prompt`` under ``fusion``."""
        nll, _ = self.option_nlls(prompt, [continuation], {"m": fusion})
        return nll["m"][0]

    # -- generation -------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[int] | np.ndarray,
        fusion: FusionPlan | Selector,
        *,
        sampling: SamplingParams | None = None,
        max_tokens: int = 256,
        stop: Sequence[str] = (),
        utf8_guard: bool = True,
        draft: int = 0,
        session: Session | None = None,
    ) -> Generation:
        """Fused generation as an iterator of text pieces (see :class:`Generation`).

        ``fusion`` is either fixed weights (a :class:`FusionPlan`) or a :class:`Selector`, which
        picks TriMix's (alpha, beta) on this prompt during the prompt evaluation generation needs
        anyway. Several generations may be started and read in any order: each has its own
        sequence (up to ``LoadOptions.n_seq`` decode together; the others wait their turn).
        ``draft`` > 0 lets the small models draft that many tokens per round for the large model to
        check in one batch (speculative decoding, see :mod:`.speculative`): greedy gives the same text as
        without it; sampling keeps the same fused distribution, but not the same draws for a seed.
        With ``session`` (from :meth:`session`) the prompt reuses what the conversation's cache holds
        and only its new tokens are evaluated; the reply stays in the cache for the next turn.
        """
        spec = SeqSpec(fusion, sampling or SamplingParams(), max_tokens, tuple(stop), utf8_guard, draft)
        return self.generate_many(prompt, [spec], session=session)[0]

    @locked
    def generate_many(
        self, prompt: str | Sequence[int] | np.ndarray, specs: Sequence[SeqSpec], session: Session | None = None
    ) -> list[Generation]:
        """Several sequences continuing one prompt, evaluated once and shared (for instance every
        method of an evaluation). They start together and run side by side."""
        self._check_open()
        for spec in specs:
            check_max_tokens(spec.max_tokens)
            self._need(spec.roles, "this method")
        return self.scheduler.submit(self._as_tokens(prompt), specs, session)

    def session(self) -> Session:
        """A conversation whose tokens stay in every model's KV cache between turns: each
        :meth:`generate` with it evaluates only what its prompt adds to the cached prefix (the
        perplexity selection still covers the whole prompt). It holds one of the ``n_seq``
        sequences until closed; use it as a context manager."""
        self._check_open()
        return self.scheduler.open_session()

    def generate_batch(
        self, prompts: Sequence[str | Sequence[int] | np.ndarray], specs: SeqSpec | Sequence[SeqSpec]
    ) -> list[Generation]:
        """One generation per prompt (``specs`` one for all, or one per prompt), queued together:
        up to ``LoadOptions.n_seq`` decode side by side, the rest start as sequences free up.
        Read them in any order; :meth:`run` waits for all."""
        if isinstance(specs, SeqSpec):
            specs = [specs] * len(prompts)
        if len(specs) != len(prompts):
            raise TrimixError(f"{len(prompts)} prompts but {len(specs)} settings")
        return [self.generate_many(p, [s])[0] for p, s in zip(prompts, specs)]

    def run(self, gens: Sequence[Generation]) -> list[Generation]:
        """Drive the engine until every generation in ``gens`` is finished."""
        self.scheduler.run(gens)
        return list(gens)
