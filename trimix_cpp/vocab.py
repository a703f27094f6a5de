"""Checking that models can be fused, and the vocabulary they share.

Logit fusion adds up rows of logits position by position, so it is only meaningful when token id
``i`` means the same bytes in every model. Models of one family often differ in one harmless way:
the embedding matrix is padded past the real tokenizer (Qwen2.5 has 151,936 rows for 151,665
tokens). Those ids are fused over the ids all models share and a padding id is never emitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import VocabularyMismatchError

# llama.cpp token attribute bits (llama_token_attr)
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_CONTROL = 1 << 3
ATTR_BYTE = 1 << 5


@dataclass(frozen=True)
class SharedVocab:
    """The vocabulary every model agrees on.

    ``pieces`` are the bytes each id adds to generated text (empty for control tokens);
    ``banned`` marks ids that must never be sampled: padding and unused entries, and the
    ``<unk>`` token. ``specials`` maps the text of each control or user-defined token
    (``<|im_start|>``) to its id, for parsing a prompt template's markup.
    """

    n_vocab: int
    pieces: list[bytes]
    banned: np.ndarray
    eog: np.ndarray
    specials: dict[str, int] = field(default_factory=dict)

    @property
    def max_piece_len(self) -> int:
        return max((len(p) for p in self.pieces), default=0)


def _shown(piece: bytes) -> str:
    return repr(piece.decode("utf-8", errors="backslashreplace"))


def check_same_vocabulary(names: Sequence[str], special_pieces: Sequence[list[bytes]]) -> int:
    """Return the number of ids all models share, or raise naming the first id that differs.

    ``special_pieces[k]`` is model k's bytes for every id, control tokens rendered as their text.
    A model may have more ids than another only past the shared range (padding).
    """
    n_shared = min(len(p) for p in special_pieces)
    ref_name, ref = names[0], special_pieces[0]
    for name, pieces in zip(names[1:], special_pieces[1:]):
        if pieces[:n_shared] == ref[:n_shared]:
            continue
        first = next(i for i in range(n_shared) if pieces[i] != ref[i])
        raise VocabularyMismatchError(
            f"vocabularies differ at token id {first}: {_shown(ref[first])} in {ref_name} but "
            f"{_shown(pieces[first])} in {name} (fuse only models that share one tokenizer)"
        )
    return n_shared


def padding_mask(n_shared: int, special_pieces: Sequence[list[bytes]], attrs: Sequence[np.ndarray]) -> np.ndarray:
    """Ids in the shared range that no model may emit: unused or unknown entries in any model."""
    banned = np.zeros(n_shared, dtype=bool)
    for a in attrs:
        banned |= (a[:n_shared] & (ATTR_UNUSED | ATTR_UNKNOWN)) != 0
    return banned
