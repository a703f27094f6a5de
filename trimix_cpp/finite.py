"""Report values that never overflow: perplexities that saturate, and JSON numbers that are null where JSON has none.

A prompt NLL is finite for any weights inside the accepted bounds, but its perplexity ``exp(nll)``
is not: past an NLL of about 709.78 nats (weights such as alpha = 1000, beta = -1000 reach it)
``math.exp`` raises ``OverflowError``, which once stopped a whole server from building one reply.
Every perplexity a report shows is computed here, and every JSON report passes its numbers through
:func:`json_number` or :func:`json_safe`, since JSON has no infinity and no NaN (Python's ``json``
would write ``Infinity``, which strict parsers refuse).
"""

from __future__ import annotations

import math
import sys
from typing import Any

# The largest NLL whose exponential is still a finite double.
MAX_EXP_ARG = math.log(sys.float_info.max)


def perplexity(nll: float) -> float:
    """``exp(nll)``, or ``inf`` where that is past the largest double (NaN stays NaN); never raises."""
    if nll > MAX_EXP_ARG:
        return math.inf
    return math.exp(nll)


def json_number(x: float) -> float | None:
    """``x``, or None where it is infinite or NaN."""
    return x if math.isfinite(x) else None


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float inside dicts, lists and tuples replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
