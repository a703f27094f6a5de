"""Response bodies and stream chunks in OpenAI's shapes, with TriMix's own facts in an extra field.

Every response carries ``usage`` (token counts) and ``trimix``: the method and weights that ran, the
selection that chose them (strategy, chosen pair, the grid's perplexities) when one did, the sampling
settings (with the seed, so a sampled reply can be reproduced), why the engine stopped, and timings.
A stream ends with a chunk holding the finish reason and ``trimix``, then, when
``stream_options.include_usage`` asks for it, a chunk with ``usage`` and no choices, then
``data: [DONE]``.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

# The engine's reasons for stopping, in OpenAI's words: it stopped by itself or at a stop string
# ("stop"), or ran out of room ("length").
FINISH_REASONS = {
    "eog": "stop",
    "stop": "stop",
    "no-valid-token": "stop",
    "length": "length",
    "context": "length",
}


@dataclass
class Outcome:
    """A finished generation, copied out of the engine by the thread that owns it."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    method: str
    weights: dict[str, float]
    selection: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    sampling: dict[str, float | int] | None = None  # temperature, top_k, top_p, min_p, seed (when sampled)
    logprobs: list[dict[str, Any]] | None = None  # per token: id, token, bytes, logprob, top_logprobs

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def trimix(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "weights": self.weights, "finish_reason": self.finish_reason}
        if self.selection is not None:
            out["selection"] = self.selection
        if self.sampling is not None:
            out["sampling"] = self.sampling
        out["timings"] = self.timings
        return out

    @property
    def openai_finish_reason(self) -> str:
        return FINISH_REASONS.get(self.finish_reason, "stop")

    def openai_logprobs(self, chat: bool) -> dict[str, Any] | None:
        """The fused distribution's log-probabilities in OpenAI's shape: the chat API's ``content``
        list, or the completions API's parallel lists."""
        if self.logprobs is None:
            return None
        if chat:
            return {
                "content": [
                    {
                        "token": e["token"],
                        "logprob": e["logprob"],
                        "bytes": e["bytes"],
                        "top_logprobs": [
                            {"token": t["token"], "logprob": t["logprob"], "bytes": t["bytes"]}
                            for t in e["top_logprobs"]
                        ],
                    }
                    for e in self.logprobs
                ]
            }
        offsets, pos = [], 0
        for e in self.logprobs:
            offsets.append(pos)
            pos += len(e["token"])
        return {
            "tokens": [e["token"] for e in self.logprobs],
            "token_logprobs": [e["logprob"] for e in self.logprobs],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in self.logprobs],
            "text_offset": offsets,
        }


class Reply:
    """Builds one request's response or chunks; ``chat`` picks the chat shapes."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, o: Outcome) -> dict[str, Any]:
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": o.text},
                "logprobs": o.openai_logprobs(True),
                "finish_reason": o.openai_finish_reason,
            }
            body = self._head("chat.completion")
        else:
            choice = {
                "index": 0,
                "text": o.text,
                "logprobs": o.openai_logprobs(False),
                "finish_reason": o.openai_finish_reason,
            }
            body = self._head("text_completion")
        return body | {"choices": [choice], "usage": o.usage(), "trimix": o.trimix()}

    def _chunk(self, delta: dict[str, str] | str, finish: str | None) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return self._head("chat.completion.chunk") | {"choices": [choice]}
        choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}
        return self._head("text_completion") | {"choices": [choice]}

    def first(self) -> bytes | None:
        """The chat stream's opening chunk (the assistant's role); completions have none."""
        return sse(self._chunk({"role": "assistant", "content": ""}, None)) if self.chat else None

    def piece(self, text: str) -> bytes:
        return sse(self._chunk({"content": text} if self.chat else text, None))

    def last(self, o: Outcome, include_usage: bool) -> bytes:
        end = self._chunk({} if self.chat else "", o.openai_finish_reason) | {"trimix": o.trimix()}
        if o.logprobs is not None:  # every token's, in the closing chunk (the text streams as characters)
            end["choices"][0]["logprobs"] = o.openai_logprobs(self.chat)
        out = sse(end)
        if include_usage:
            out += sse(self._head(end["object"]) | {"choices": [], "usage": o.usage()})
        return out + DONE


DONE = b"data: [DONE]\n\n"


def sse(obj: dict[str, Any]) -> bytes:
    """One server-sent event holding ``obj`` as JSON (UTF-8, one line)."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"
