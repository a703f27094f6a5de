"""The one exception type users see.

Every failure a user can cause (a wrong path, a model that will not fuse, a prompt that does not fit)
is raised as :class:`TrimixError` with a message of one line that names the problem and the fix, so
the command line can print it as it is and exit non-zero without a traceback.
"""

from __future__ import annotations


class TrimixError(Exception):
    """A user-facing error whose message is a single line: what is wrong, then what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class ModelFileError(TrimixError):
    """A model file is missing, is not GGUF, or llama.cpp cannot load it."""


class VocabularyMismatchError(TrimixError):
    """Two models give different bytes for the same token id, so their logits cannot be fused."""


class ContextOverflowError(TrimixError):
    """The prompt does not fit in the context window."""


class WeightError(TrimixError):
    """Fusion weights are not finite numbers, or a method was asked for a role it does not use."""
