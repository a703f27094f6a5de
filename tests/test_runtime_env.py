"""Whether weights may use llama.cpp's extra CPU buffer types (AMX), checked in fresh interpreters,
since the build's features are read once when llama.cpp's library loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = "import trimix_cpp._llama as L; print('-', L.extra_buffers_usable())"


def probe(**env: str) -> list[str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "TRIMIX_CPU_EXTRA_BUFFERS")
    }
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env={**base, **env}, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


@pytest.mark.slow
def test_extra_buffers_follow_the_build_and_the_override():
    from trimix_cpp._llama import system_info

    amx = "AMX_INT8 = 1" in system_info()
    assert probe()[1] == str(not amx)
    assert probe(TRIMIX_CPU_EXTRA_BUFFERS="0")[1] == "False"
    assert probe(TRIMIX_CPU_EXTRA_BUFFERS="1")[1] == "True"


@pytest.mark.parametrize("setting", ["0", ""])
def test_a_model_decodes_without_extra_buffers(tiny_trio, setting):
    code = (
        "import sys, numpy as np; from trimix_cpp._llama import LlamaModel; "
        "m = LlamaModel(sys.argv[1], n_ctx=64, n_gpu_layers=0); m.decode(m.tokenize('the cat', True)); "
        "print(bool(np.isfinite(m.logits_row(-1)).all()))"
    )
    env = {**os.environ, "TRIMIX_CPU_EXTRA_BUFFERS": setting}
    r = subprocess.run(
        [sys.executable, "-c", code, str(tiny_trio["large_ins"])], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr
