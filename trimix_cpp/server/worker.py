"""The one thread that owns the engine: it loads the models, starts requests, steps, and hands text out.

llama.cpp contexts and the scheduler are not thread-safe, and the event loop must never wait on a
decode, so everything that touches the engine runs here: tokenizing prompts, queueing requests,
``scheduler.step()`` (which admits waiting requests and decodes one token of every active sequence
in one batch), reading each generation's new text with ``take()``, and finally closing the models.
Request handlers live on the asyncio loop; they talk to this thread only through

* :meth:`EngineWorker.submit`, which appends a :class:`Job` to an inbox under a lock, and
* each job's asyncio queue, which this thread fills with ``loop.call_soon_threadsafe``: an
  :class:`Accepted` once the prompt is queued (streams only), a :class:`Pieces` for each step that
  produced text (streams only), then one :class:`Done` or :class:`Failed`. The handler reads them
  with a ``match``.

A job is cancelled from the loop with :meth:`Job.cancel` (a flag read here, and
``Generation.cancel()``); the next step frees its sequence and KV cells. While nothing is queued or
running the thread sleeps on a condition variable, so an idle server costs no CPU.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import TrimixError
from ..fusion import FusionPlan
from ..generation import Generation, NonFiniteLogitsError, SeqSpec
from ..sampling import SamplingParams
from .conversations import ConversationCache
from .errors import APIError, from_trimix, request_name, server_error, shutting_down, still_loading
from .responses import Outcome

if TYPE_CHECKING:
    from ..engine import Engine

log = logging.getLogger("trimix.server")

PromptMaker = Callable[["Engine"], np.ndarray]


@dataclass(frozen=True)
class Accepted:
    """The prompt is tokenized and queued on the engine: a stream may send its headers now."""

    prompt_tokens: int


@dataclass(frozen=True)
class Pieces:
    """The text one step of the generation added."""

    text: str


@dataclass(frozen=True)
class Done:
    """The generation finished: what it reports, copied out of the engine."""

    outcome: Outcome


@dataclass(frozen=True)
class Failed:
    """The request ends with this error (its generation, if it had one, is gone)."""

    error: APIError


# What the engine thread tells a request's handler, in this order: Accepted?, Pieces*, Done | Failed.
Event = Accepted | Pieces | Done | Failed


@dataclass(eq=False)
class Job:
    """One request's generation, shared by its handler (on the loop) and the worker thread."""

    make_prompt: PromptMaker  # run in the worker: the prompt's token ids
    spec: SeqSpec
    loop: asyncio.AbstractEventLoop
    stream: bool
    prompt_param: str = "prompt"  # the request field a too-long prompt came from
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    gen: Generation | None = None
    cancelled: bool = False

    def cancel(self) -> None:
        """Stop generating for this request (from any thread); its sequence is freed at the next step."""
        self.cancelled = True
        gen = self.gen
        if gen is not None:
            gen.cancel()

    def send(self, event: Event) -> None:
        """Hand an event to the request's handler on its event loop (from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


@dataclass(frozen=True)
class EngineInfo:
    """Facts about the loaded engine that request handlers need, read once after loading."""

    n_ctx: int
    n_vocab: int
    n_seq: int
    roles: tuple[str, ...]
    files: dict[str, str]


class EngineWorker:
    """Owns the engine on its own thread. ``load`` builds the engine; ``on_loaded`` runs right
    after on the same thread (to read metadata such as the chat template); ``on_failure`` is
    called with the exception when loading fails."""

    def __init__(
        self,
        load: Callable[[], Engine],
        on_loaded: Callable[[Engine], None] | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
        keep_conversations: bool = True,
    ) -> None:
        self._load = load
        self._keep_conversations = keep_conversations  # reuse a conversation's cached prefix (.conversations)
        self._cache: ConversationCache | None = None
        self._on_loaded = on_loaded
        self._on_failure = on_failure
        self._cv = threading.Condition()
        self._inbox: list[Job] = []
        self._stopping = False
        self.draining = False  # set (without a lock, so a signal handler may set it) to end every request
        self.ready = threading.Event()  # set once loading has finished, well or not
        self.loaded = False
        self.load_error: BaseException | None = None
        self.failure: BaseException | None = None  # what ended the engine's loop after loading, if anything did
        self.info: EngineInfo | None = None
        self.stats: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, name="trimix-engine", daemon=True)

    # -- the loop's side ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        if self.draining or self._stopping:
            raise shutting_down()
        if not self.loaded:
            raise still_loading()
        with self._cv:
            self._inbox.append(job)
            self._cv.notify()

    def stop(self, timeout: float | None = None) -> None:
        """End every request, free the models and wait for the thread (idempotent)."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- the worker thread -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            engine = self._load()
        except BaseException as e:
            self.load_error = e
            self.ready.set()
            if self._on_failure is not None:
                self._on_failure(e)
            return
        live: list[Job] = []
        try:
            if self._on_loaded is not None:
                self._on_loaded(engine)
            self.info = EngineInfo(
                n_ctx=engine.n_ctx,
                n_vocab=engine.vocab.n_vocab,
                n_seq=engine.scheduler.n_seq,
                roles=engine.roles,
                files={r: m.path.name for r, m in engine.models.items()},
            )
            if self._keep_conversations:
                self._cache = ConversationCache(engine)
            self._publish(engine)
            self.loaded = True
            self.ready.set()
            self._serve(engine, live)
        except BaseException as e:  # a failure of the loop itself: the server cannot go on
            log.error("the engine thread failed: %s", e)
            log.debug("%s", traceback.format_exc())
            if not self.ready.is_set():
                self.load_error = e
                self.ready.set()
            else:
                self.failure = e
            if self._on_failure is not None:
                self._on_failure(e)
        finally:
            self._stopping = True
            with self._cv:
                left, self._inbox = self._inbox, []
            for job in live + left:
                job.cancel()
                job.send(Failed(shutting_down()))
            if self._cache is not None:
                self._cache.close()
            engine.close()
            self.stats = {}

    def _serve(self, engine: Engine, live: list[Job]) -> None:
        sched = engine.scheduler
        while True:
            with self._cv:
                while not self._inbox and sched.idle and not self._stopping:
                    self._cv.wait()
                new, self._inbox = self._inbox, []
                if self._stopping:
                    self._inbox = new
                    return
            if self.draining:
                for job in live + new:
                    job.cancel()
                    job.send(Failed(shutting_down()))
                live.clear()
                new = []
            for job in new:
                self._start(engine, job, live)
            if self._cache is not None:
                self._cache.make_room()
            if not sched.idle:
                try:
                    sched.step()
                except Exception as e:  # a bug, not a request's fault: end what was running, go on
                    log.error("engine step failed: %s: %s", type(e).__name__, e)
                    log.debug("%s", traceback.format_exc())
                    for job in live:
                        job.cancel()
                        job.send(Failed(server_error()))
                    live.clear()
                    try:
                        sched.reap()
                    except Exception:
                        log.debug("%s", traceback.format_exc())
            self._deliver(live)
            self._publish(engine)

    def _start(self, engine: Engine, job: Job, live: list[Job]) -> None:
        """Tokenize the job's prompt and queue it on the engine, or answer its error."""
        if job.cancelled:
            return
        try:
            tokens = job.make_prompt(engine)
            if len(tokens) >= engine.n_ctx:
                raise APIError(
                    400,
                    f"this model's maximum context length is {engine.n_ctx} tokens, but the prompt is "
                    f"{len(tokens)} tokens (shorten the prompt)",
                    param=job.prompt_param,
                    code="context_length_exceeded",
                )
            session = None
            if self._cache is not None and not job.spec.draft:  # speculative decoding runs outside sessions
                session = self._cache.pick(np.asarray(tokens, dtype=np.int32))
            gen = engine.generate_many(tokens, [job.spec], session=session)[0]
        except APIError as e:
            job.send(Failed(e))
            return
        except TrimixError as e:
            err = from_trimix(e)
            if err.code == "context_length_exceeded":
                err.param = job.prompt_param
            job.send(Failed(err))
            return
        except Exception as e:
            log.error("starting a request failed: %s: %s", type(e).__name__, e)
            log.debug("%s", traceback.format_exc())
            job.send(Failed(server_error()))
            return
        job.gen = gen
        if job.cancelled:  # cancelled while it was being queued
            gen.cancel()
        live.append(job)
        if job.stream:
            job.send(Accepted(len(tokens)))

    def _deliver(self, live: list[Job]) -> None:
        """Hand each job the text its generation produced in this step, and the outcome when done.

        A failure while building one job's reply (a bug, or a value that cannot be reported) ends
        that job alone with a 500: the thread, and every other request, go on."""
        for job in list(live):
            try:
                self._deliver_one(job, live)
            except Exception as e:
                log.error("building a reply failed: %s: %s", type(e).__name__, e)
                log.debug("%s", traceback.format_exc())
                if job in live:
                    live.remove(job)
                job.cancel()
                job.send(Failed(server_error()))

    def _deliver_one(self, job: Job, live: list[Job]) -> None:
        gen = job.gen
        assert gen is not None
        pieces = gen.take()
        if pieces and job.stream:
            job.send(Pieces("".join(pieces)))
        if gen.finish_reason is None:
            return
        live.remove(job)
        if job.cancelled or gen.finish_reason == "cancelled":
            return
        if gen.error is not None:
            err = gen.error
            if isinstance(err, NonFiniteLogitsError):
                job.send(Failed(from_trimix(err)))
            else:
                log.error("generation failed: %s: %s", type(err).__name__, err)
                message = f"generation failed: {err.render(request_name)}" if isinstance(err, TrimixError) else None
                job.send(Failed(server_error(message) if message else server_error()))
            return
        job.send(Done(outcome(gen)))

    def _publish(self, engine: Engine) -> None:
        s = engine.scheduler
        cached = self._cache.cached_cells if self._cache is not None else 0
        self.stats = {
            "sequences": s.n_seq,
            "active": len(s.active),
            "queued": len(s.queue),
            "kv_cells": s.kv_cells,
            "kv_cells_free": s.cells_free + cached,  # idle conversations' cells are given back on demand
            "kv_cells_cached": cached,
        }


def outcome(gen: Generation) -> Outcome:
    """What a finished generation reports, copied so the loop never reads engine state."""
    fusion = gen.fusion
    return Outcome(
        text=gen.text,
        prompt_tokens=len(gen.prompt_tokens),
        completion_tokens=len(gen.token_ids),
        finish_reason=str(gen.finish_reason),
        method=fusion.method if isinstance(fusion, FusionPlan) else "trimix",
        weights=dict(fusion.weights) if isinstance(fusion, FusionPlan) else {},
        selection=gen.selection.as_dict() if gen.selection is not None else None,
        timings=gen.timings.as_dict(),
        sampling=sampling_dict(gen.spec.sampling),
        logprobs=gen.as_dict().get("logprobs") if gen.logprobs is not None else None,  # type: ignore[arg-type]
    )


def sampling_dict(p: SamplingParams) -> dict[str, float | int]:
    """The sampling settings a reply was generated with; greedy decoding has no seed to report, and
    the repetition penalties are listed when one is on."""
    out: dict[str, float | int] = {"temperature": 0.0}
    if not p.greedy:
        out = {"temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p, "min_p": p.min_p, "seed": p.seed}
    penalties = {
        "repeat_penalty": (getattr(p, "repeat_penalty", 1.0), 1.0),
        "frequency_penalty": (getattr(p, "frequency_penalty", 0.0), 0.0),
        "presence_penalty": (getattr(p, "presence_penalty", 0.0), 0.0),
    }
    if any(v != off for v, off in penalties.values()):
        out |= {k: v for k, (v, _) in penalties.items()}
        out["repeat_last_n"] = getattr(p, "repeat_last_n", 64)
    return out
