"""Chat messages to prompt tokens, with markup that only the template can write.

Shared by ``trimix chat``, ``trimix generate --chat`` and the server's chat route, so the three
build the same prompt tokens for the same messages.

A chat template turns messages into one text in which the template's own markup (``<|im_start|>``,
``<|im_end|>``) must become control tokens, while nothing a user typed may: a message containing
``<|im_end|>\\n<|im_start|>system`` has to stay characters, or any user could end their turn and
speak as the system. Rendering the messages and tokenizing the result with special parsing on would
lose that distinction. So the template is rendered twice:

1. with every message's content replaced by a marker (a private-use character, a per-process random
   number and the message's index), which shows where each content lands in the template's text;
2. with the real contents, which is the text the template means.

When (1) with each marker replaced by its content, or by its content stripped (templates that
apply ``| trim``), is exactly (2), the text is known to be template text between the markers and
message text at them: template text is parsed for control tokens, message text never is
(:func:`trimix_cpp.modelset.markup_tokens`). A template that changes message text in any other way
is refused with a clear error instead of being guessed at.

Templates come from GGUF metadata, which is untrusted input (rendering one without a sandbox was a
remote-code-execution hole in llama-cpp-python), so they are compiled only in Jinja's
:class:`~jinja2.sandbox.ImmutableSandboxedEnvironment`: no attribute access to Python internals and
no mutation of the messages passed in.

A profile's own prompt template, when it has one, is used instead: each user turn goes into its
``{prompt}`` slot (after any system text, separated by a blank line) and each assistant turn
follows as plain text.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .errors import TrimixError
from .modelset import PROMPT_SLOT, markup_tokens

if TYPE_CHECKING:
    from .engine import Engine

ROLES = ("system", "developer", "user", "assistant")
CHAT_TEMPLATE_KEY = "tokenizer.chat_template"


class ChatTemplateError(TrimixError):
    """The conversation cannot be formatted: the template refused it, failed, or rewrites message text."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    name: str | None = None


Parts = list[tuple[str, bool]]  # (text, is_markup)


class ChatFormat(Protocol):
    """Turns a conversation into text parts: template markup, and message text that stays text."""

    source: str

    def parts(self, messages: Sequence[Message]) -> Parts: ...


def prompt_tokens(engine: Engine, parts: Parts) -> np.ndarray:
    """The token ids of formatted parts, with the model's BOS unless the template wrote it already."""
    ids = markup_tokens(engine, parts)
    ref = engine.models[engine.reference_role]
    if ref.add_bos and (len(ids) == 0 or ids[0] != ref.bos_id):
        ids = np.concatenate([np.asarray([ref.bos_id], dtype=np.int32), ids])
    return ids


class JinjaChat:
    """A chat template from GGUF metadata (Hugging Face conventions), rendered in a sandbox."""

    source = "the large-ins model's chat template"

    def __init__(self, template: str, bos_token: str = "", eos_token: str = "") -> None:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self.template = env.from_string(template)
        except TemplateError as e:
            raise ChatTemplateError(f"{self.source} does not compile: {e}") from None
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._nonce = str(secrets.randbelow(10**12)).zfill(12)
        self._marker = re.compile("\ue000" + self._nonce + r"(\d{4})\ue001")

    def _render(self, messages: Sequence[Message], contents: Sequence[str]) -> str:
        from jinja2 import TemplateError

        msgs = []
        for m, c in zip(messages, contents):
            d = {"role": m.role, "content": c}
            if m.name is not None:
                d["name"] = m.name
            msgs.append(d)
        try:
            return self.template.render(
                messages=msgs, add_generation_prompt=True, bos_token=self.bos_token, eos_token=self.eos_token
            )
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError) as e:
            raise ChatTemplateError(f"{self.source} failed on this conversation: {type(e).__name__}: {e}") from None

    def parts(self, messages: Sequence[Message]) -> Parts:
        if len(messages) >= 10_000:
            raise ChatTemplateError(f"a conversation holds at most 9999 messages, got {len(messages)}")
        tag = "\ue000" + self._nonce
        if any(tag in m.content for m in messages):
            raise ChatTemplateError("a message contains text reserved for the chat template's markers")
        markers = [f"{tag}{i:04d}\ue001" for i in range(len(messages))]
        marked = self._render(messages, markers)
        real = self._render(messages, [m.content for m in messages])
        for strip in (False, True):
            texts = [m.content.strip() if strip else m.content for m in messages]
            pieces = self._split(marked, texts)
            if "".join(t for t, _ in pieces) == real:
                return pieces
        raise ChatTemplateError(
            f"{self.source} changes the text of messages (beyond trimming spaces), so trimix cannot tell the "
            "template's markup from what users wrote; give the profile a prompt template instead"
        )

    def _split(self, marked: str, texts: Sequence[str]) -> Parts:
        out: Parts = []
        pos = 0
        for m in self._marker.finditer(marked):
            if m.start() > pos:
                out.append((marked[pos : m.start()], True))
            i = int(m.group(1))
            if i >= len(texts):  # not a marker of ours: leave it as the template wrote it
                out.append((m.group(0), True))
            else:
                out.append((texts[i], False))
            pos = m.end()
        if pos < len(marked):
            out.append((marked[pos:], True))
        return out


class ProfileChat:
    """A profile's ``{prompt}`` template applied to each user turn."""

    source = "the profile's prompt template"

    def __init__(self, template: str) -> None:
        self.template = template

    def parts(self, messages: Sequence[Message]) -> Parts:
        out: Parts = []
        system: list[str] = []
        for m in messages:
            if m.role in ("system", "developer"):
                system.append(m.content)
            elif m.role == "user":
                text = "\n\n".join([*system, m.content])
                system = []
                for i, chunk in enumerate(self.template.split(PROMPT_SLOT)):
                    if i:
                        out.append((text, False))
                    out.append((chunk, True))
            else:
                out.append((m.content, False))
        return out


class NoChat:
    """Chat is unavailable; every conversation gets the reason."""

    source = "none"

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def parts(self, messages: Sequence[Message]) -> Parts:
        raise ChatTemplateError(self.reason)


def chat_format(engine: Engine, profile_template: str | None) -> ChatFormat:
    """The profile's template when it has one, else the large-ins model's GGUF chat template."""
    if profile_template is not None and profile_template != PROMPT_SLOT:
        return ProfileChat(profile_template)
    ref = engine.models[engine.reference_role]
    source = ref.meta(CHAT_TEMPLATE_KEY)
    if not source:
        return NoChat(
            f"the {engine.reference_role} model has no chat template ({CHAT_TEMPLATE_KEY}) and the profile gives "
            "none: use /v1/completions (or generate without --chat) to send plain text, or a profile with a "
            "prompt template"
        )
    names = {i: t for t, i in engine.vocab.specials.items()}
    eos = ref.meta("tokenizer.ggml.eos_token_id")
    bos_text = names.get(ref.bos_id, "")
    eos_text = names.get(int(eos), "") if eos is not None and eos.lstrip("-").isdigit() else ""
    try:
        return JinjaChat(source, bos_text, eos_text)
    except ChatTemplateError as e:
        return NoChat(str(e))


def _tojson(value: Any, indent: int | None = None) -> str:
    """Hugging Face templates expect JSON as written, not HTML-escaped as Jinja's own filter does."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"the chat template refused this conversation: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def chat_prompt(engine: Engine, profile_template: str | None, text: str, system: str | None = None) -> np.ndarray:
    """The prompt tokens of one user message (after an optional system prompt) in the chat format
    :func:`chat_format` picks: what ``trimix generate --chat`` sends, token for token what the
    server's chat route builds for the same messages."""
    fmt = chat_format(engine, profile_template)
    if isinstance(fmt, NoChat):
        raise ChatTemplateError(fmt.reason)
    messages = ([Message("system", system)] if system else []) + [Message("user", text)]
    return prompt_tokens(engine, fmt.parts(messages))
