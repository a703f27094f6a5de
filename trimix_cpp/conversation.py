"""A conversation with the fused models: its messages, the prompt they make, and each turn's reply.

This is what ``trimix chat`` runs on (the command only reads lines and prints). The messages go
through the same chat template code as the server's chat route (:mod:`trimix_cpp.chat_template`),
so the same words make the same prompt tokens in both. The conversation keeps an engine
:class:`~trimix_cpp.generation.Session`: each turn's prompt repeats the earlier turns, which the
models' KV caches still hold, so only the new message (and the template's markup around it) is
evaluated.

When a prompt no longer leaves room for a reply in the context, the oldest turns (a user message
and the reply to it) are dropped, the system prompt kept, and :attr:`Turn.dropped` says how many.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .chat_template import ChatFormat, Message, prompt_tokens
from .errors import ContextOverflowError, TrimixError
from .fusion import FusionPlan
from .generation import Generation, SeqSpec, check_max_tokens
from .methods import MethodChoice, resolve_fusion, sampling_params

if TYPE_CHECKING:
    from .engine import Engine

SAVE_FORMAT = "trimix-chat/1"


SAMPLER_KEYS = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "seed",
    "repeat_penalty",
    "repeat_last_n",
    "frequency_penalty",
    "presence_penalty",
)
_FILTERS = ("top_k", "top_p", "min_p", "seed")  # what only sampling uses (greedy would ignore it)


@dataclass(frozen=True)
class ChatSettings:
    """What the next turn runs with: the method (as asked for, so the profile's defaults still
    apply), the sampler settings given (None: not given), the reply's length and stop strings."""

    choice: MethodChoice = field(default_factory=MethodChoice)
    sampling: dict[str, Any] = field(default_factory=dict)
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    utf8_guard: bool = True

    def spec(self, profile: object | None = None) -> SeqSpec:
        """The engine's settings, by the command line's rules (a setting that would be ignored is refused)."""
        check_max_tokens(self.max_tokens)
        if self.max_tokens == 0:
            raise TrimixError("{max_tokens} must be at least 1 in a conversation", param="max_tokens")
        fusion = resolve_fusion(self.choice, profile)
        sampling = sampling_params(**{k: v for k, v in self.sampling.items() if v is not None})
        return SeqSpec(fusion, sampling, self.max_tokens, tuple(self.stop), self.utf8_guard)

    def changed(self, **changes: Any) -> ChatSettings:
        """These settings with ``changes``: ``choice`` (a whole :class:`MethodChoice`), ``max_tokens``,
        ``stop``, or sampler keys (None clears one). A temperature of 0 (greedy) clears the filters
        that only sampling uses."""
        sampling = dict(self.sampling)
        top = {}
        for k, v in changes.items():
            if k in SAMPLER_KEYS:
                sampling[k] = v
            elif k in ("choice", "max_tokens", "stop", "utf8_guard"):
                top[k] = v
            else:
                raise TrimixError(f"unknown setting {k!r}")
        if changes.get("temperature", None) == 0:
            for k in _FILTERS:
                sampling.pop(k, None)
        return replace(self, sampling={k: v for k, v in sampling.items() if v is not None}, **top)

    def describe(self, profile: object | None = None) -> dict[str, Any]:
        """The settings in force, for ``/settings``."""
        spec = self.spec(profile)
        fusion = spec.fusion
        out: dict[str, Any] = {}
        if isinstance(fusion, FusionPlan):
            out["method"] = fusion.method
            out.update({k: v for k, v in fusion.params.items()})
        else:
            out["method"] = f"trimix, weights chosen per turn by {fusion.strategy}"
        s = spec.sampling
        out["temperature"] = s.temperature
        out.update({k: getattr(s, k) for k in SAMPLER_KEYS if k != "temperature" and hasattr(s, k)})
        out["max_tokens"] = self.max_tokens
        out["stop"] = list(self.stop)
        return out


@dataclass
class Turn:
    """One reply being generated: iterate :attr:`generation` for its text; :meth:`Conversation.commit`
    adds it to the conversation (also after a stop part-way, with the text shown so far)."""

    generation: Generation
    prompt_tokens: int
    dropped: int = 0  # earlier turns dropped so that this one fits the context


@dataclass
class Conversation:
    """Messages and the settings of the next turn, over an engine and a chat format."""

    engine: Engine
    format: ChatFormat
    settings: ChatSettings = field(default_factory=ChatSettings)
    profile: object | None = None
    system: str | None = None
    messages: list[Message] = field(default_factory=list)  # user and assistant turns, oldest first
    reserve: int | None = None  # tokens kept free for a reply (default: max_tokens, at most half the context)

    def __post_init__(self) -> None:
        self.spec = self.settings.spec(self.profile)
        self.session = self.engine.session()

    def close(self) -> None:
        self.session.close()

    # -- the prompt -------------------------------------------------------------------------------

    def _all(self, messages: Sequence[Message]) -> list[Message]:
        return ([Message("system", self.system)] if self.system else []) + list(messages)

    def tokens(self, messages: Sequence[Message] | None = None) -> np.ndarray:
        """The prompt tokens of the conversation (by default its own messages), ready for a reply."""
        msgs = self._all(self.messages if messages is None else messages)
        return prompt_tokens(self.engine, self.format.parts(msgs))

    def room(self) -> int:
        """Tokens a prompt may use: the context less what a reply needs."""
        n_ctx = self.engine.n_ctx
        reserve = self.reserve if self.reserve is not None else min(self.spec.max_tokens, n_ctx // 2)
        return n_ctx - max(1, reserve)

    def fit(self) -> tuple[np.ndarray, int]:
        """The prompt tokens, after dropping the oldest turns until they leave room for a reply;
        returns them and how many turns were dropped. The last user message is never dropped: if it
        alone does not fit, one line says so."""
        dropped = 0
        while True:
            ids = self.tokens()
            if len(ids) <= self.room():
                return ids, dropped
            if len(self.messages) <= 1:
                raise ContextOverflowError(
                    "this message makes a prompt of {n} tokens, but the context of {held} must keep {keep} for the "
                    "reply (raise {n_ctx}, lower {max_tokens} or shorten the message)",
                    param="n_ctx",
                    n=len(ids),
                    held=self.engine.n_ctx,
                    keep=self.engine.n_ctx - self.room(),
                )
            # a turn is a user message and what follows it up to the next user message
            cut = next((i for i in range(1, len(self.messages)) if self.messages[i].role == "user"), len(self.messages))
            if cut >= len(self.messages):  # only the last user message (and nothing after it) would stay
                cut = len(self.messages) - 1
            del self.messages[:cut]
            dropped += 1

    # -- turns ------------------------------------------------------------------------------------

    def ask(self, text: str) -> Turn:
        """Add a user message and start the reply."""
        if not text.strip():
            raise TrimixError("the message is empty")
        self.messages.append(Message("user", text))
        try:
            return self._start()
        except BaseException:
            self.messages.pop()
            raise

    def regen(self) -> Turn:
        """Generate the last reply again (from the same prompt)."""
        if self.messages and self.messages[-1].role == "assistant":
            last = self.messages.pop()
            try:
                return self._start()
            except BaseException:
                self.messages.append(last)
                raise
        if self.messages and self.messages[-1].role == "user":
            return self._start()
        raise TrimixError("there is no reply to generate again (send a message first)")

    def _start(self) -> Turn:
        ids, dropped = self.fit()
        gen = self.engine.generate_many(ids, [self.spec], session=self.session)[0]
        return Turn(gen, len(ids), dropped)

    def commit(self, turn: Turn, text: str | None = None) -> None:
        """Add the turn's reply (``text``: what was shown, when the reply was stopped part-way)."""
        reply = turn.generation.text if text is None else text
        self.messages.append(Message("assistant", reply))

    def clear(self) -> None:
        """Forget every turn (the system prompt stays)."""
        self.messages.clear()

    def configure(self, **changes: Any) -> None:
        """Change the settings of the next turns (see :meth:`ChatSettings.changed`); nothing changes
        when the result is refused."""
        settings = self.settings.changed(**changes)
        spec = settings.spec(self.profile)
        self.settings, self.spec = settings, spec

    # -- files ------------------------------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": SAVE_FORMAT,
            "system": self.system,
            "messages": [{"role": m.role, "content": m.content} for m in self.messages],
        }

    def save(self, path: str | Path) -> None:
        """Write the conversation as JSON (beside the target first, then renamed: never half-written)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self.as_dict(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise TrimixError(f"cannot write {path}: {e.strerror or e}") from None

    def load(self, path: str | Path) -> None:
        """Replace the messages (and the system prompt) with those saved in ``path``."""
        system, messages = read_conversation(path)
        self.system, self.messages = system, messages


def read_conversation(path: str | Path) -> tuple[str | None, list[Message]]:
    """The system prompt and messages of a saved conversation, checked."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TrimixError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrimixError(f"{path} is not a saved conversation (not UTF-8 JSON: {e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise TrimixError(f'{path} is not a saved conversation (expected an object with a "messages" list)')
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise TrimixError(f'{path}: "system" must be a string or null')
    out = []
    for i, m in enumerate(data["messages"]):
        if (
            not isinstance(m, dict)
            or m.get("role") not in ("user", "assistant")
            or not isinstance(m.get("content"), str)
        ):
            raise TrimixError(f'{path}: messages[{i}] must be {{"role": "user" or "assistant", "content": "text"}}')
        out.append(Message(m["role"], m["content"]))
    return system, out
