"""What a request gets when it does not say: ``trimix serve``'s own defaults over the profile's.

``trimix serve --method/--alpha/--beta/--gamma/--select/--temperature/--page`` sets the server's
defaults; what the command line leaves out comes from the language profile, then from trimix's
built-in defaults (TriMix with PPL selection, greedy, the page in chat mode). The defaults are
checked once at start with the command line's rules (:func:`trimix_cpp.methods.resolve_fusion`),
so a server never starts with a default that every request would fail on.

A request that names no fusion setting gets the default method *and* its weights. A request that
names the default method but no weights gets the default weights too; a request that chooses
another method, or any weight or strategy, gets exactly what it asked for (weights meant for one
method never leak into another).

A sampled request without a seed gets a fresh random one, which the response reports, so any
reply can be reproduced by sending its seed back.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass

from ..errors import TrimixError
from ..fusion import LARGE_BASE, METHODS, ROLES, plan
from ..methods import MethodChoice, resolve_fusion, sampling_params
from ..modelset import ModelSet
from ..profiles import PAGE_MODES
from ..selection import SELECTION_ROLES

# A fresh seed is below 2**32: it survives a JSON round trip through any client (JavaScript numbers
# are exact only up to 2**53) and is what llama.cpp's own server uses.
SEED_LIMIT = 2**32


@dataclass(frozen=True)
class ServeDefaults(MethodChoice):
    """The server's defaults for requests and for the chat page: a fusion choice as the command line
    makes it (``serve`` sets method, alpha, beta, gamma and select), a temperature, and the page's
    mode; ``None``: the profile's, then trimix's."""

    temperature: float | None = None
    page: str | None = None

    def resolved(self, profile: object | None) -> ServeDefaults:
        """These defaults with the profile's filled in, checked as the command line checks them.

        Raises :class:`TrimixError` (about the parameter) for a combination no request could use.
        """
        method = self.method or getattr(profile, "method", None) or "trimix"
        fusion = resolve_fusion(dataclasses.replace(self, method=method), profile)  # --alpha with proxy and the like
        params = dict(getattr(fusion, "params", None) or {})
        select = None
        alpha, beta, gamma = self.alpha, self.beta, self.gamma
        if method == "trimix":
            select = self.select or ("fixed" if alpha is not None or beta is not None else None)
            select = select or getattr(profile, "select", None) or "ppl"
        if select in (None, "fixed"):  # the weights that run, written out (a profile's pair, proxy's beta 1)
            alpha, beta, gamma = params.get("alpha"), params.get("beta"), params.get("gamma")
        temperature = self.temperature
        if temperature is None:
            temperature = getattr(profile, "temperature", None)
        sampling_params(temperature)  # raises for a negative or non-finite temperature
        page = self.page or getattr(profile, "page", None)
        if page is not None and page not in PAGE_MODES:
            raise TrimixError(
                "{page} must be {choices}, got {got!r}", param="page", choices=" or ".join(PAGE_MODES), got=page
            )
        return dataclasses.replace(
            self, method=method, alpha=alpha, beta=beta, gamma=gamma, select=select, temperature=temperature, page=page
        )

    def apply(self, choice: MethodChoice) -> MethodChoice:
        """A request's fusion choice with these (resolved) defaults where it said nothing."""
        if choice.method not in (None, self.method):
            return choice
        names_weights = any(
            v is not None
            for v in (choice.alpha, choice.beta, choice.gamma, choice.select, choice.grid_alpha, choice.grid_beta)
        )
        if names_weights or choice.role is not None:
            return dataclasses.replace(choice, method=self.method)
        return dataclasses.replace(
            choice, method=self.method, alpha=self.alpha, beta=self.beta, gamma=self.gamma, select=self.select
        )

    def as_dict(self) -> dict[str, object]:
        """For ``/v1/models``: what the page shows as "server default"."""
        out: dict[str, object] = {"method": self.method}
        for k in ("select", "alpha", "beta", "gamma"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        out["temperature"] = self.temperature or 0.0
        out["page"] = self.page
        return out


def roles_to_load(modelset: ModelSet, method: str | None) -> list[str]:
    """The models a server loads, in canonical order: every file given explicitly and the profile's
    own, except the large base model, which only trimix4 reads, so it is loaded when given
    explicitly or when trimix4 is the default ``method``; with neither a file nor a profile, the
    selection trio (whose missing files then fail with the flag to give)."""
    wanted = [r for r in ROLES if r in modelset.explicit or (r != LARGE_BASE and modelset.profile is not None)]
    if method == "trimix4":
        wanted.append(LARGE_BASE)
    return [r for r in ROLES if r in wanted] or list(SELECTION_ROLES)


def available_methods(roles: tuple[str, ...] | list[str]) -> list[str]:
    """The methods whose models are all loaded (``single`` runs on any one of them)."""
    loaded = set(roles)
    out = []
    for m in METHODS:
        if m == "single":
            if loaded:
                out.append(m)
        elif set(plan(m, alpha=0.5, beta=0.5, gamma=0.5).roles) <= loaded:
            out.append(m)
    return out


def fresh_seed() -> int:
    """A random seed for a sampled request that gave none."""
    return secrets.randbelow(SEED_LIMIT)
