"""Which model files run, and how the user's text becomes a prompt: a profile plus explicit paths.

``--lang`` names a profile (models, defaults, a prompt template); an explicit ``--large-ins`` (or
another role's flag) overrides the profile's file for that role. The prompt template is the profile
author's, so control-token text in it (chat markup such as ``<|im_start|>``) is parsed into control
tokens, the way llama.cpp tokenizes chat templates; the user's own text never is, so typing
``<|im_end|>`` cannot inject a control token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import TrimixError
from .fusion import ROLES
from .profiles import Profile, find_profile

if TYPE_CHECKING:
    from .engine import Engine, LoadOptions

PROMPT_SLOT = "{prompt}"


@dataclass
class ModelSet:
    """Model files and defaults from ``--lang``'s profile, overridden by explicit paths."""

    profile: Profile | None
    explicit: dict[str, Path]

    @classmethod
    def make(cls, lang: str | None = None, paths: Mapping[str, str | Path | None] | None = None) -> ModelSet:
        given = {r: Path(p) for r, p in (paths or {}).items() if p is not None}
        unknown = [r for r in given if r not in ROLES]
        if unknown:
            raise TrimixError(f"unknown role {unknown[0]!r} (roles are {', '.join(ROLES)})")
        profile = find_profile(lang) if lang is not None else None
        return cls(profile, given)

    def paths(self, roles: Sequence[str], what: str) -> dict[str, Path]:
        """The file of each role in ``roles``; one line naming the missing flag otherwise."""
        out = {}
        for r in roles:
            if r in self.explicit:
                out[r] = self.explicit[r]
            elif self.profile is not None and r in self.profile.models:
                out[r] = self.profile.locate(r)
            else:
                raise TrimixError(
                    "{what} needs {param} (the path of its GGUF file) or {lang} with a profile", param=r, what=what
                )
        return out

    def n_ctx(self, given: int | None) -> int:
        if given is not None:
            return given
        return self.profile.n_ctx if self.profile else 4096

    def load_options(
        self, n_ctx: int | None = None, threads: int = 0, n_gpu_layers: int = -1, verbose: bool = False, **extra
    ) -> LoadOptions:
        from .engine import LoadOptions

        return LoadOptions(
            n_ctx=self.n_ctx(n_ctx), n_threads=threads or None, n_gpu_layers=n_gpu_layers, verbose=verbose, **extra
        )

    def stops(self, given: Sequence[str] | None) -> list[str]:
        """Explicit stop strings, else the profile's."""
        if given is not None:
            return list(given)
        return list(self.profile.stop) if self.profile else []

    def has_template(self) -> bool:
        return self.profile is not None and self.profile.template != PROMPT_SLOT

    def prompt(self, engine: Engine, text: str, raw: bool = False) -> str | np.ndarray:
        """The user's text, or its token ids once placed in the profile's template."""
        if raw and self.profile is None:
            raise TrimixError("{raw} skips a profile's prompt template, but no {lang} profile is in use", param="raw")
        if raw or not self.has_template():
            return text
        return template_tokens(engine, self.profile.template, text)


def template_tokens(engine: Engine, template: str, text: str) -> np.ndarray:
    """Token ids of ``template`` with ``text`` in its ``{prompt}`` slots.

    The template's own control-token text becomes those tokens; everything else, the user's text
    included, is tokenized as plain text in runs that span template and user text alike, so the ids
    are the ones llama.cpp gives the whole string when the user typed no markup.
    """
    parts: list[tuple[str, bool]] = []
    for i, part in enumerate(template.split(PROMPT_SLOT)):
        if i:
            parts.append((text, False))
        parts.append((part, True))
    ref = engine.models[engine.reference_role]
    body = markup_tokens(engine, parts)
    return np.concatenate([[ref.bos_id], body]).astype(np.int32) if ref.add_bos else body


def markup_tokens(engine: Engine, parts: Sequence[tuple[str, bool]]) -> np.ndarray:
    """Token ids of a text made of ``(text, is_markup)`` parts, without BOS.

    Control-token text is parsed only inside markup parts (a template's own text); the other parts
    (what users wrote) never become control tokens. Plain text is tokenized in runs that cross part
    boundaries, so the ids equal llama.cpp's for the whole string whenever the users typed no markup.
    """
    specials = engine.vocab.specials
    segments: list[str | int] = []  # plain-text runs and control-token ids, in order
    run: list[str] = []
    for text, markup in parts:
        if not markup:
            run.append(text)
            continue
        for piece in _split_specials(text, specials):
            if isinstance(piece, int):
                segments += ["".join(run), piece]
                run = []
            else:
                run.append(piece)
    segments.append("".join(run))
    ref = engine.models[engine.reference_role]
    ids: list[np.ndarray] = []
    for seg in segments:
        if isinstance(seg, int):
            ids.append(np.asarray([seg], dtype=np.int32))
        elif seg:
            ids.append(ref.tokenize(seg, add_bos=False, special=False))
    return np.concatenate(ids).astype(np.int32) if ids else np.zeros(0, dtype=np.int32)


def _split_specials(text: str, specials: Mapping[str, int]) -> list[str | int]:
    """``text`` as plain runs and special-token ids, taking the longest special text at each place
    (as llama.cpp's tokenizer partitions a string with special parsing on)."""
    if not specials or not text:
        return [text] if text else []
    by_first: dict[str, list[str]] = {}
    for s in sorted(specials, key=len, reverse=True):
        by_first.setdefault(s[0], []).append(s)
    out: list[str | int] = []
    start = i = 0
    while i < len(text):
        hit = next((s for s in by_first.get(text[i], ()) if text.startswith(s, i)), None)
        if hit is None:
            i += 1
            continue
        if i > start:
            out.append(text[start:i])
        out.append(specials[hit])
        i = start = i + len(hit)
    if start < len(text):
        out.append(text[start:])
    return out
