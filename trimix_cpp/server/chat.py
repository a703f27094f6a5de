"""Chat messages of an OpenAI request, checked, and the chat template code they go through.

The templates (GGUF chat templates rendered in a sandbox, a profile's prompt template) live in
:mod:`trimix_cpp.chat_template`, shared with the command line; this module checks the request's
messages and re-exports the template API for the server.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..chat_template import (
    CHAT_TEMPLATE_KEY,
    ROLES,
    ChatFormat,
    ChatTemplateError,
    JinjaChat,
    Message,
    NoChat,
    Parts,
    ProfileChat,
    chat_format,
    prompt_tokens,
)

__all__ = [
    "CHAT_TEMPLATE_KEY",
    "ROLES",
    "ChatFormat",
    "ChatTemplateError",
    "JinjaChat",
    "Message",
    "NoChat",
    "Parts",
    "ProfileChat",
    "chat_format",
    "messages_from_request",
    "prompt_tokens",
]


def messages_from_request(raw: Sequence[Any]) -> list[Message]:
    """Checked messages: known roles, text content (a string or text parts), a user turn last."""
    from .errors import APIError

    if not raw:
        raise APIError(400, "messages is empty (send at least one user message)", param="messages")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if m.role not in ROLES:
            raise APIError(
                400,
                f"{where}.role {m.role!r} is not supported (use system, user or assistant; trimix does not call tools)",
                param=f"{where}.role",
                code="unsupported",
            )
        content = m.content
        if content is None:
            raise APIError(400, f"{where}.content is required", param=f"{where}.content")
        if isinstance(content, list):
            texts = []
            for k, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                    raise APIError(
                        400,
                        f'{where}.content[{k}] must be a text part {{"type": "text", "text": "..."}} '
                        "(trimix reads text only)",
                        param=f"{where}.content[{k}]",
                        code="unsupported",
                    )
                texts.append(part["text"])
            content = "\n".join(texts)
        out.append(Message("system" if m.role == "developer" else m.role, content, m.name))
    if out[-1].role != "user":
        raise APIError(
            400, "the last message must be the user's (trimix writes the assistant's reply)", param="messages"
        )
    return out
