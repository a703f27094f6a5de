"""The OpenAI request bodies the server accepts, checked field by field, and what they ask the engine for.

Requests are validated strictly: a field of the wrong type is a 400 naming the field (``"2"`` is not a
number, ``1.5`` is not a token count, ``true`` is neither), and a field trimix does not know is a 400
too, as with OpenAI, instead of being dropped in silence. The penalties (``frequency_penalty``,
``presence_penalty``, and llama.cpp's ``repeat_penalty`` with ``repeat_last_n``) and ``logprobs`` apply
to the fused distribution. OpenAI fields that trimix does not implement (``n``, ``logit_bias``, tools,
...) are accepted only at the value that asks for nothing, so a client never gets a reply that quietly
ignored what it asked for. The TriMix settings travel in an extra object, ``"trimix": {"method",
"alpha", "beta", "select", ...}``, and go through the same rules as the command line
(:mod:`trimix_cpp.methods`): the profile's defaults, and a refusal for a setting the chosen mode would
ignore.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any, Literal, get_type_hints

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from ..errors import TrimixError
from ..generation import MAX_TOP_LOGPROBS, SeqSpec
from ..methods import MethodChoice, resolve_fusion, sampling_params
from .defaults import ServeDefaults, fresh_seed
from .errors import APIError, from_trimix

MAX_STOPS = 16
# Speculative decoding is a per-sequence setting of the engine when its SeqSpec has the field.
HAS_DRAFT = "draft" in {f.name for f in dataclasses.fields(SeqSpec)}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# A request's "trimix" object: the command line's fusion choice (MethodChoice's fields, with a grid as
# a JSON list), less the settings that are the server's to make (a weights file on its disk, the memory
# a selection may take), plus the sequence's own switches.
_SERVER_ONLY = ("weights_from", "max_logits_mib")
_REQUEST_TYPES: dict[str, Any] = {"grid_alpha": list[float] | str | None, "grid_beta": list[float] | str | None}
CHOICE_FIELDS = tuple(f.name for f in dataclasses.fields(MethodChoice) if f.name not in _SERVER_ONLY)
TrimixSettings = create_model(
    "TrimixSettings",
    __base__=_Strict,
    __doc__="How the logits are fused; every field defaults to the server's profile.",
    **{name: (_REQUEST_TYPES.get(name, get_type_hints(MethodChoice)[name]), None) for name in CHOICE_FIELDS},
    draft=(int | None, None),
    utf8_guard=(bool | None, None),
)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class _Common(_Strict):
    """Fields both endpoints share."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # llama.cpp's server accepts these two as well
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repeat_penalty: float | None = None  # llama.cpp's server's names
    repeat_last_n: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    trimix: TrimixSettings | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(_Strict):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None


# What each field must be, for messages that say it in words.
_EXPECTED = {
    "model": "a string",
    "prompt": "a string, a list of one string, or a list of token ids",
    "messages": "a list of messages",
    "role": "a string",
    "content": "a string or a list of text parts",
    "name": "a string",
    "user": "a string",
    "method": "a string",
    "select": "a string",
    "stop": "a string or a list of strings",
    "stream": "true or false",
    "include_usage": "true or false",
    "echo": "true or false",
    "logprobs": "true or false (chat) or a whole number of alternatives (completions)",
    "utf8_guard": "true or false",
    "parallel_tool_calls": "true or false",
    "grid_alpha": "a list of numbers",
    "grid_beta": "a list of numbers",
    "logit_bias": "an object of numbers",
    "tools": "a list",
    "trimix": 'an object such as {"method": "trimix", "select": "ppl"}',
    "stream_options": 'an object such as {"include_usage": true}',
    "response_format": '{"type": "text"}',
    "tool_choice": '"none"',
}
# ... and each item of a list field
_EXPECTED_ITEM = {
    "messages": 'an object such as {"role": "user", "content": "..."}',
    "stop": "a string",
    "prompt": "a string or a token id",
    "grid_alpha": "a number",
    "grid_beta": "a number",
}
_INTS = {
    "max_tokens",
    "max_completion_tokens",
    "top_k",
    "seed",
    "n",
    "best_of",
    "top_logprobs",
    "draft",
    "repeat_last_n",
}
_FLOATS = {
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repeat_penalty",
    "alpha",
    "beta",
    "gamma",
}
_UNION_MEMBERS = {"str", "int", "float", "bool"}


def _param(loc: Sequence[int | str]) -> str:
    """``('messages', 0, 'content', 'str')`` -> ``messages[0].content``: field names and list
    indexes, without the names pydantic gives the members of a union (``list[str]``)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier() and part not in _UNION_MEMBERS:
            out += ("." if out else "") + part
    return out


def _shown(value: Any) -> str:
    """The offending value as JSON, cut short (the client's own input, so safe to echo)."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except ValueError:
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse(model: type[_Common], body: dict[str, Any]) -> _Common:
    """The request as ``model``, or a 400 naming the first field that is wrong."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
    raise _field_error(first["type"], first["loc"], first["msg"], body)


def _field_error(kind: str, loc: Sequence[int | str], msg: str, body: dict[str, Any]) -> APIError:
    param = _param(loc)
    parts = param.replace("[", ".[").split(".")
    last = parts[-1]
    if kind == "extra_forbidden":
        where = f" in {param.rsplit('.', 1)[0]}" if "." in param else ""
        return APIError(400, f"unrecognized request argument {last!r}{where}", param=param, code="unknown_field")
    if kind == "missing":
        return APIError(400, f"{param} is required", param=param, code="missing_field")
    if last.startswith("["):  # an item of a list
        owner = next((p for p in reversed(parts) if not p.startswith("[")), "")
        expected = _EXPECTED_ITEM.get(owner, "a valid item")
    elif last in _EXPECTED:
        expected = _EXPECTED[last]
    elif last in _INTS:
        expected = "a whole number"
    elif last in _FLOATS:
        expected = "a number"
    else:
        expected = f"valid ({msg})"
    got = _value_at(body, loc)
    return APIError(400, f"{param} must be {expected}, got {_shown(got)}", param=param, code="invalid_type")


def _value_at(body: Any, loc: Sequence[int | str]) -> Any:
    """The value a validation error points at (union member names skipped)."""
    cur = body
    for part in loc:
        if isinstance(part, int) and isinstance(cur, list) and 0 <= part < len(cur):
            cur = cur[part]
        elif isinstance(part, str) and isinstance(cur, dict) and part in cur:
            cur = cur[part]
    return cur


def refuse_unsupported(req: _Common) -> None:
    """OpenAI fields trimix does not implement, accepted only at the value that asks for nothing."""
    neutral: list[tuple[str, Any, bool, str]] = [
        ("n", req.n, req.n in (None, 1), "trimix returns one choice per request (send several requests)"),
        ("logit_bias", req.logit_bias, not req.logit_bias, "trimix does not bias single tokens"),
    ]
    if isinstance(req, CompletionRequest):
        neutral += [
            ("echo", req.echo, not req.echo, "trimix does not echo the prompt"),
            ("suffix", req.suffix, not req.suffix, "trimix does not insert text (no suffix)"),
            ("best_of", req.best_of, req.best_of in (None, 1), "trimix returns one choice per request"),
        ]
    if isinstance(req, ChatRequest):
        neutral += [
            ("tools", req.tools, not req.tools, "trimix does not call tools"),
        ]
    for name, value, ok, why in neutral:
        if not ok:
            raise APIError(400, f"{name}={_shown(value)} is not supported: {why}", param=name, code="unsupported")


@dataclasses.dataclass(frozen=True)
class Limits:
    """The server's side of a request: defaults and bounds."""

    n_ctx: int
    default_max_tokens: int = 256
    profile: object | None = None
    profile_stops: tuple[str, ...] = ()
    defaults: ServeDefaults | None = None  # trimix serve's own, resolved over the profile's


def seq_spec(req: _Common, limits: Limits) -> SeqSpec:
    """The engine's settings for this request, by the command line's rules; a 400 otherwise."""
    refuse_unsupported(req)
    t = req.trimix or TrimixSettings()
    if t.draft is not None and not HAS_DRAFT:
        raise APIError(
            400,
            "trimix.draft (speculative decoding) is not available in this version of trimix; drop it",
            param="trimix.draft",
            code="unsupported",
        )
    choice = MethodChoice(**{name: getattr(t, name) for name in CHOICE_FIELDS})
    if limits.defaults is not None:
        choice = limits.defaults.apply(choice)
    max_tokens = req.max_tokens
    if isinstance(req, ChatRequest) and req.max_completion_tokens is not None:
        if max_tokens is not None:
            raise APIError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
        max_tokens = req.max_completion_tokens
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    elif not 1 <= max_tokens <= limits.n_ctx:
        raise APIError(
            400,
            f"max_tokens must be from 1 to {limits.n_ctx} (the context length), got {max_tokens}",
            param="max_tokens",
            code="invalid_value",
        )
    if req.stop is None:
        stops: tuple[str, ...] = limits.profile_stops
    else:
        stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
        if len(stops) > MAX_STOPS:
            raise APIError(400, f"stop holds at most {MAX_STOPS} strings, got {len(stops)}", param="stop")
    try:
        fusion = resolve_fusion(choice, limits.profile)
    except TrimixError as e:
        raise from_trimix(e) from None
    temperature, seed = req.temperature, req.seed
    if temperature is None and limits.defaults is not None:
        temperature = limits.defaults.temperature
    if seed is None and temperature:  # sampled without a seed: a fresh one, reported in the response
        seed = fresh_seed()
    try:
        sampling = sampling_params(
            temperature,
            req.top_k,
            req.top_p,
            req.min_p,
            seed,
            req.repeat_penalty,
            req.repeat_last_n,
            req.frequency_penalty,
            req.presence_penalty,
        )
    except TrimixError as e:
        raise from_trimix(e) from None
    extra: dict[str, Any] = {"draft": t.draft} if t.draft is not None else {}
    extra["logprobs"] = _logprobs(req)
    return SeqSpec(fusion, sampling, max_tokens, stops, True if t.utf8_guard is None else t.utf8_guard, **extra)


def _logprobs(req: _Common) -> int | None:
    """How many alternatives each token's log-probability comes with (None: no log-probabilities)."""
    if isinstance(req, ChatRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs", code="invalid_value")
        n = (req.top_logprobs or 0) if req.logprobs else None
        param = "top_logprobs"
    else:
        n = getattr(req, "logprobs", None)
        param = "logprobs"
    if n is not None and not 0 <= n <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"{param} must be from 0 to {MAX_TOP_LOGPROBS}, got {n}", param=param, code="invalid_value")
    return n


def completion_prompt(req: CompletionRequest) -> str | list[int]:
    """One prompt: a string, a list holding one string, or token ids."""
    p = req.prompt
    if isinstance(p, str):
        return p
    if not p:
        raise APIError(400, "prompt is empty", param="prompt", code="invalid_value")
    if isinstance(p[0], str):
        if len(p) != 1:
            raise APIError(
                400, f"prompt holds {len(p)} prompts; trimix takes one per request", param="prompt", code="unsupported"
            )
        return p[0]
    return list(p)  # type: ignore[arg-type]
