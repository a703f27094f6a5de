"""From what a user asked for to what runs: method, weights, selection, sampling.

The command line, the evaluation and the server all take the same choices (a method, maybe weights,
maybe a selection strategy and its grid, a profile's defaults), so the rules live here once:

* the method comes from the request, else the profile, else ``trimix``;
* TriMix's (alpha, beta) come from ``--alpha/--beta``, else from a weights file, else from the
  selection strategy (``ppl`` by default, or the profile's), else from the profile's fixed pair;
* a setting that the chosen mode would ignore is refused with one line that says why, never
  dropped in silence: ``--alpha`` with ``--method proxy`` (Proxy Tuning fixes the large model's
  weight at 1), ``--grid-alpha`` with fixed weights, ``--top-p`` with greedy decoding, and so on.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import TrimixError, WeightError
from .fusion import LARGE_BASE, LARGE_INS, METHODS, ROLES, FusionPlan, plan
from .sampling import SamplingParams
from .selection import DEFAULT_MAX_LOGITS_MIB, SELECTION_ROLES, STRATEGIES, Selector, parse_grid

# Which of alpha, beta, gamma each method takes (the others are refused).
_METHOD_WEIGHTS: dict[str, tuple[str, ...]] = {
    "trimix": ("alpha", "beta"),
    "trimix4": ("alpha", "beta", "gamma"),
    "proxy": ("beta",),
    "contrastive": ("beta",),
    "single": (),
}
_WHY_NOT = {
    "proxy": "Proxy Tuning weighs the large model by 1 and the small pair by {beta}",
    "contrastive": "Contrastive Decoding uses only the small models, weighted by {beta}",
    "single": "a single model has no weights",
    "trimix": "Eq. 5 TriMix has no separate scaling weight (use {method} trimix4)",
}


def _field(name: str) -> str:
    """A template field for a parameter chosen at run time (see :mod:`trimix_cpp.errors`)."""
    return "{" + name + "}"


@dataclass(frozen=True)
class MethodChoice:
    """What was asked for; ``None`` means "not given" so that a default and an explicit value can
    be told apart (only an explicit value can be refused as ignored)."""

    method: str | None = None
    alpha: float | None = None
    beta: float | None = None
    gamma: float | None = None
    role: str | None = None
    select: str | None = None
    grid_alpha: Sequence[float] | str | None = None
    grid_beta: Sequence[float] | str | None = None
    max_logits_mib: float | None = None
    weights_from: str | Path | None = None


def resolve_fusion(
    choice: MethodChoice,
    profile: object | None = None,
    locate: Callable[[tuple[str, ...]], Mapping[str, Path]] | None = None,
) -> FusionPlan | Selector:
    """The fixed weights (a :class:`FusionPlan`) or the per-prompt :class:`Selector` to run.

    ``profile`` supplies defaults (``method``, ``select``, ``alpha``, ``beta``); ``locate`` maps
    roles to model files and is needed only to check a ``weights_from`` file against the models.
    """
    c = choice
    method = c.method or getattr(profile, "method", None) or "trimix"
    if method not in METHODS:
        raise WeightError(
            "unknown method {got!r} (choose one of {choices})", param="method", got=method, choices=", ".join(METHODS)
        )
    given = {k: v for k, v in (("alpha", c.alpha), ("beta", c.beta), ("gamma", c.gamma)) if v is not None}
    for name in given:
        if name not in _METHOD_WEIGHTS[method]:
            raise WeightError(
                f"{{method}} {{chosen}} takes no {_field(name)}: {_WHY_NOT[method]}", param="method", chosen=method
            )
    if c.role is not None and method != "single":
        raise WeightError(
            "{role} chooses the model of {method} single; {method} {chosen} uses several", param="role", chosen=method
        )
    if c.select is not None and c.select not in STRATEGIES:
        raise WeightError("unknown selection strategy {got!r} (choose fixed, ppl or ent)", param="select", got=c.select)
    if method != "trimix":
        if c.select not in (None, "fixed"):
            raise WeightError(
                "{select} {chosen} chooses TriMix's weights; it does not apply to {method} {method_name}",
                param="select",
                chosen=c.select,
                method_name=method,
            )
        if c.weights_from is not None:
            raise WeightError(
                "{weights_from} holds TriMix's (alpha, beta); it does not apply to {method} {chosen}",
                param="weights_from",
                chosen=method,
            )
        _refuse_grid(c, "{method} {chosen} has fixed weights", chosen=method)
        return plan(method, alpha=c.alpha, beta=c.beta, gamma=c.gamma, role=c.role or LARGE_INS)

    if c.weights_from is not None:
        if given or c.select not in (None, "fixed"):
            raise WeightError("{weights_from} sets alpha and beta: drop {alpha}/{beta}/{select}", param="weights_from")
        _refuse_grid(c, "{weights_from} fixes the weights")
        if locate is None:
            raise TrimixError("{weights_from} needs the model files to check it against", param="weights_from")
        from .calibrate import load_weights

        a, b = load_weights(c.weights_from, locate(SELECTION_ROLES))
        return plan("trimix", alpha=a, beta=b)

    select = c.select
    if select is None:
        select = "fixed" if given else (getattr(profile, "select", None) or "ppl")
    if select == "fixed":
        _refuse_grid(c, "fixed weights select nothing")
        alpha = c.alpha if c.alpha is not None else getattr(profile, "alpha", None)
        beta = c.beta if c.beta is not None else getattr(profile, "beta", None)
        return plan("trimix", alpha=alpha, beta=beta)
    if given:
        raise WeightError(
            f"{{select}} {{chosen}} chooses alpha and beta itself: drop {', '.join(_field(k) for k in given)} "
            "or use {select} fixed",
            param="select",
            chosen=select,
        )
    if select == "ent" and c.max_logits_mib is not None:
        raise WeightError(
            "{max_logits_mib} bounds perplexity selection's memory; {select} ent does not use it",
            param="max_logits_mib",
        )
    return Selector(
        select,
        _grid(c.grid_alpha, "grid_alpha"),
        _grid(c.grid_beta, "grid_beta"),
        DEFAULT_MAX_LOGITS_MIB if c.max_logits_mib is None else c.max_logits_mib,
    )


def _grid(values: Sequence[float] | str | None, name: str) -> tuple[float, ...]:
    """A grid, with its errors naming the flag (or, on the server, the request field) it came from."""
    try:
        return parse_grid(values)
    except WeightError as e:
        raise WeightError("{param}: {error}", param=name, error=e) from None


def _refuse_grid(c: MethodChoice, why: str, **values: object) -> None:
    """Refuse a grid setting where nothing is selected; ``why`` is a message template filled by ``values``."""
    for name, value in (("grid_alpha", c.grid_alpha), ("grid_beta", c.grid_beta), ("max_logits_mib", c.max_logits_mib)):
        if value is not None:
            raise WeightError("{param} applies to {select} ppl/ent, but " + why, param=name, **values)


def fusion_roles(fusion: FusionPlan | Selector) -> tuple[str, ...]:
    """The model roles a fixed plan or a selector needs, in canonical order."""
    return SELECTION_ROLES if isinstance(fusion, Selector) else fusion.roles


def check_models_used(fusion: FusionPlan | Selector, given: Sequence[str], method: str) -> None:
    """Refuse an explicitly given model file that the method would not load."""
    used = fusion_roles(fusion)
    for role in ROLES:
        if role in given and role not in used:
            extra = " (only {method} trimix4 uses it)" if role == LARGE_BASE else ""
            raise WeightError(
                f"{{method}} {{chosen}} does not use {{param}}{extra}; drop it", param=role, chosen=method
            )


def sampling_params(
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    seed: int | None = None,
    repeat_penalty: float | None = None,
    repeat_last_n: int | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
) -> SamplingParams:
    """Sampling settings from optional flags; the filters and the seed need a temperature > 0,
    since greedy decoding would ignore them. The repetition penalties apply to greedy decoding
    too; ``repeat_last_n`` needs one of them."""
    t = 0.0 if temperature is None else temperature
    params = SamplingParams(
        temperature=t,
        top_k=0 if top_k is None else top_k,
        top_p=1.0 if top_p is None else top_p,
        min_p=0.0 if min_p is None else min_p,
        seed=0 if seed is None else seed,
        repeat_penalty=1.0 if repeat_penalty is None else repeat_penalty,
        repeat_last_n=64 if repeat_last_n is None else repeat_last_n,
        frequency_penalty=0.0 if frequency_penalty is None else frequency_penalty,
        presence_penalty=0.0 if presence_penalty is None else presence_penalty,
    )
    params.validate()
    if params.greedy:
        # a filter at the value that keeps every token (top_k 0, top_p 1, min_p 0: what OpenAI clients
        # often send by default) asks for nothing, so greedy decoding takes it; any seed asks for sampling
        unset = ((top_k, 0), (top_p, 1.0), (min_p, 0.0), (seed, None))
        for name, (value, neutral) in zip(("top_k", "top_p", "min_p", "seed"), unset):
            if value is not None and value != neutral:
                raise TrimixError(
                    "{param} applies to sampling, but decoding is greedy: set {temperature} > 0", param=name
                )
    if repeat_last_n is not None and all(v is None for v in (repeat_penalty, frequency_penalty, presence_penalty)):
        raise TrimixError(
            "{repeat_last_n} sets the window of the repetition penalties, but none is given "
            "(add {repeat_penalty}, {frequency_penalty} or {presence_penalty})",
            param="repeat_last_n",
        )
    return params


# The sampling settings by name, as the command line, a batch line and a chat take them.
SAMPLING_FIELDS = tuple(inspect.signature(sampling_params).parameters)
