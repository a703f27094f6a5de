"""The one exception type users see.

Every failure a user can cause (a wrong path, a model that will not fuse, a prompt that does not fit)
is raised as :class:`TrimixError` with a message of one line that names the problem and the fix, so
the command line can print it as it is and exit non-zero without a traceback.

The same parameter has a different name for each kind of caller: ``max_tokens`` in Python,
``--max-tokens`` on the command line, the request field ``max_tokens`` (or ``trimix.alpha``) on the
server. So an error about a parameter carries it as data, not as text: its message is a template in
which ``{name}`` stands for the parameter ``name``, ``param`` is the parameter at fault, and
:meth:`TrimixError.render` writes the names as one caller knows them::

    raise TrimixError("{max_tokens} must be a whole number >= 0, got {got!r}", param="max_tokens", got=n)

``str(e)`` names the Python argument (``max_tokens must be ...``); the command line renders with
:func:`flag` (``--max-tokens must be ...``); the server with its request fields. Values given as
keywords (``got=n``) fill the fields that are not parameters; they are formatted, never parsed, so
braces in them are safe (braces in the template itself are written ``{{`` and ``}}``). A value that
is itself a :class:`TrimixError` is rendered with the same names, so wrapping an error keeps them.
The field ``{param}`` names the parameter at fault, for messages where that is chosen at run time.
A message given without ``param`` or values is plain text and is shown as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

# How a caller names parameters: a table or a function from the Python name to the shown name.
Naming = Mapping[str, str] | Callable[[str], str]

# Parameters whose command-line flag is not their Python name with dashes for underscores.
FLAGS: dict[str, str] = {
    "budget_s": "--time",
    "n_seq": "--parallel",
    "types": "--type",
    "n_threads": "--threads",
    "gen_tokens": "--tokens",
    "address": "--ray",
    "out_type": "--type",
    "roles": "--role",
}


def flag(name: str) -> str:
    """The command-line flag of a library parameter: ``max_tokens`` -> ``--max-tokens``."""
    return FLAGS.get(name) or "--" + name.replace("_", "-")


class _Fields(dict):
    """The values of a template's fields; a field without a value is a parameter, shown as ``naming`` names it."""

    def __init__(self, e: TrimixError, naming: Naming | None) -> None:
        super().__init__({k: v.render(naming) if isinstance(v, TrimixError) else v for k, v in e.values.items()})
        self._naming = naming
        self._param = e.param

    def __missing__(self, key: str) -> str:
        name = self._param if key == "param" and self._param is not None else key
        if self._naming is None:
            return name
        if isinstance(self._naming, Mapping):
            return self._naming.get(name, name)
        return self._naming(name)


class TrimixError(Exception):
    """A user-facing error whose message is a single line: what is wrong, then what to do.

    ``param`` is the parameter at fault (``None`` if no single one is); ``template`` the message
    before names are filled in; ``values`` the keyword values it was raised with.
    """

    def __init__(self, message: str, *, param: str | None = None, **values: object) -> None:
        self.template = message
        self.param = param
        self.values = values
        super().__init__(self.render())

    def render(self, naming: Naming | None = None) -> str:
        """The message on one line, each parameter named by ``naming`` (its Python name if ``None``)."""
        plain = self.param is None and not self.values
        text = self.template if plain else self.template.format_map(_Fields(self, naming))
        return " ".join(text.split())


class ModelFileError(TrimixError):
    """A model file is missing, is not GGUF, or llama.cpp cannot load it."""


class VocabularyMismatchError(TrimixError):
    """Two models give different bytes for the same token id, so their logits cannot be fused."""


class ContextOverflowError(TrimixError):
    """The prompt does not fit in the context window."""


class WeightError(TrimixError):
    """Fusion weights are not finite numbers, or a method was asked for a role it does not use."""
