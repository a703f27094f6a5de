"""Whole characters out of byte tokens, and a guard that keeps the byte stream valid UTF-8.

Tibetan and Uyghur characters are two or three bytes of UTF-8, and byte-fallback vocabularies
spell them one byte token at a time, so a single token is often a fraction of a character. Two
problems follow, both solved here and nowhere else:

* Streaming: :class:`StreamDecoder` emits text only once its characters are complete, never a
  partial character and never U+FFFD for a valid byte stream.
* Validity: a fused model can pick a byte that no valid UTF-8 sequence allows at that point (the
  Proxy Tuning failure in the paper's Table 14). :class:`Utf8Guard` masks every such token.

The guard is a UTF-8 validating automaton with eight live states. At load time every token's bytes
are run through the automaton from every state at once (numpy, one pass per byte column), giving a
table ``next_state[state, token]``; at generation time the mask for the current state is one row
of that table added to the logits. No Python loop over the vocabulary ever runs per step.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

import numpy as np

# Automaton states: what the bytes emitted so far still owe.
ACCEPT = 0  # on a character boundary
NEED1 = 1  # one continuation byte 80..BF
NEED2 = 2  # two continuation bytes
NEED3 = 3  # three continuation bytes
AFTER_E0 = 4  # E0: next A0..BF, then one more
AFTER_ED = 5  # ED: next 80..9F (no surrogates), then one more
AFTER_F0 = 6  # F0: next 90..BF (no overlongs), then two more
AFTER_F4 = 7  # F4: next 80..8F (nothing past U+10FFFF), then two more
REJECT = 8
N_STATES = 8


def _byte_table() -> np.ndarray:
    """``table[state, byte]`` -> next state, following RFC 3629's table of well-formed sequences."""
    t = np.full((N_STATES + 1, 256), REJECT, dtype=np.int8)
    t[ACCEPT, 0x00:0x80] = ACCEPT
    t[ACCEPT, 0xC2:0xE0] = NEED1
    t[ACCEPT, 0xE0] = AFTER_E0
    t[ACCEPT, 0xE1:0xED] = NEED2
    t[ACCEPT, 0xED] = AFTER_ED
    t[ACCEPT, 0xEE:0xF0] = NEED2
    t[ACCEPT, 0xF0] = AFTER_F0
    t[ACCEPT, 0xF1:0xF4] = NEED3
    t[ACCEPT, 0xF4] = AFTER_F4
    t[NEED1, 0x80:0xC0] = ACCEPT
    t[NEED2, 0x80:0xC0] = NEED1
    t[NEED3, 0x80:0xC0] = NEED2
    t[AFTER_E0, 0xA0:0xC0] = NEED1
    t[AFTER_ED, 0x80:0xA0] = NEED1
    t[AFTER_F0, 0x90:0xC0] = NEED2
    t[AFTER_F4, 0x80:0x90] = NEED2
    return t


BYTE_TABLE = _byte_table()


def transition_table(pieces: Sequence[bytes]) -> np.ndarray:
    """``next_state[state, token]`` for every live state and token: REJECT where the token's bytes
    cannot follow that state in valid UTF-8.

    Vectorised over tokens: one numpy step per byte position, for all eight states together.
    """
    n = len(pieces)
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=n)
    width = int(lengths.max()) if n else 0
    blob = np.zeros((n, max(width, 1)), dtype=np.uint8)
    flat = np.frombuffer(b"".join(pieces), dtype=np.uint8)
    rows = np.repeat(np.arange(n), lengths)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])) if n else np.zeros(0, np.int64)
    cols = np.arange(len(flat)) - np.repeat(starts, lengths)
    blob[rows, cols] = flat
    state = np.repeat(np.arange(N_STATES, dtype=np.int8)[:, None], n, axis=1)
    for j in range(width):
        live = lengths > j
        state[:, live] = BYTE_TABLE[state[:, live], blob[live, j][None, :]]
    return state


class Utf8Guard:
    """Per-state additive masks (0 or -inf) over the vocabulary, plus the automaton's next state.

    The tables are built once per engine and shared by every sequence; each sequence keeps only its
    own state (an int). ``banned`` ids (padding, ``<unk>``) are -inf in every state, so one addition
    per step applies both rules. End-of-generation tokens are allowed only on a character boundary,
    so a guarded generation never stops in the middle of a character.
    """

    def __init__(self, pieces: Sequence[bytes], banned: np.ndarray, eog: np.ndarray, enabled: bool = True):
        self.enabled = enabled
        n = len(pieces)
        self.next_state = transition_table(pieces) if enabled else np.zeros((N_STATES, n), np.int8)
        penalty = np.zeros((N_STATES, n), dtype=np.float32)
        if enabled:
            penalty[self.next_state == REJECT] = -np.inf
            penalty[1:, eog] = -np.inf
        penalty[:, banned] = -np.inf
        self.penalty = penalty

    def apply(self, logits: np.ndarray, state: int) -> None:
        """Mask, in place, every token that cannot come next in ``state``."""
        np.add(logits, self.penalty[state], out=logits)

    def advance(self, state: int, token: int) -> int:
        """The state after ``token``."""
        return int(self.next_state[state, token]) if self.enabled else ACCEPT


class StreamDecoder:
    """Bytes in, whole characters out.

    Holds an incomplete trailing character back until its last byte arrives. Invalid bytes (only
    possible with the guard off) become U+FFFD, as Python's own decoder writes them.
    """

    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        return self._dec.decode(data, final=False)

    def flush(self) -> str:
        """Text still held back at the end. An incomplete character is dropped, not replaced,
        so the final text stays free of U+FFFD when generation stopped mid-character."""
        pending, _ = self._dec.getstate()
        self._dec.reset()
        if pending:
            return codecs.decode(pending, "utf-8", errors="ignore")
        return ""
