"""trimix_cpp: fuse the next-token logits of several GGUF models through llama.cpp.

import trimix_cpp as tm

fusion = tm.plan("trimix", alpha=0.1, beta=0.9)
with tm.Engine({"large_ins": "L.gguf", "small_cpt": "C.gguf", "small_base": "B.gguf"}) as eng:
    for piece in eng.generate("prompt", fusion, max_tokens=64):
        print(piece, end="", flush=True)
"""

from .engine import Engine, Generation, LoadOptions, SeqSpec, Session, Timings
from .errors import (
    ContextOverflowError,
    ModelFileError,
    TrimixError,
    VocabularyMismatchError,
    WeightError,
)
from .fusion import LARGE_BASE, LARGE_INS, METHODS, ROLES, SMALL_BASE, SMALL_CPT, Fuser, FusionPlan, plan
from .modelinfo import FusionCheck, ModelInfo, inspect_models
from .sampling import SamplingParams, make_sampler
from .selection import DEFAULT_GRID, Selection, Selector

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_GRID",
    "LARGE_BASE",
    "LARGE_INS",
    "METHODS",
    "ROLES",
    "SMALL_BASE",
    "SMALL_CPT",
    "ContextOverflowError",
    "Engine",
    "Fuser",
    "FusionCheck",
    "FusionPlan",
    "Generation",
    "LoadOptions",
    "ModelFileError",
    "ModelInfo",
    "SamplingParams",
    "Selection",
    "Selector",
    "SeqSpec",
    "Session",
    "Timings",
    "TrimixError",
    "VocabularyMismatchError",
    "WeightError",
    "inspect_models",
    "make_sampler",
    "plan",
]
