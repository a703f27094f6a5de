"""Converted models in use: three checkpoints converted by ``trimix models convert`` run through
``trimix generate`` fused (TriMix, fixed weights), and the tokens it emits are the greedy tokens of the
same fusion computed from the three checkpoints by the float64 reference forward pass."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tinyckpt
from hf_forward import forward

from trimix_cpp._llama import LlamaModel

pytestmark = pytest.mark.slow  # every test here takes over a second (see README, Tests)

TRIMIX = [sys.executable, "-m", "trimix_cli.main"]
ALPHA, BETA, N = 0.3, 0.5, 6


def test_converted_models_generate_fused_like_the_reference(tmp_path: Path) -> None:
    roles = {}
    for seed, role in enumerate(("large_ins", "small_cpt", "small_base"), start=11):
        folder = tinyckpt.write_checkpoint(tmp_path / role, "qwen2", seed=seed)
        out = tmp_path / f"{role}.gguf"
        res = subprocess.run(
            [*TRIMIX, "models", "convert", str(folder), "-o", str(out), "-t", "f32"], capture_output=True, text=True
        )
        assert res.returncode == 0, res.stderr
        roles[role] = (folder, out)
    prompt = "ئۇيغۇر the quick 123"
    res = subprocess.run(
        [
            *TRIMIX,
            "generate",
            *(x for role, (_, path) in roles.items() for x in (f"--{role.replace('_', '-')}", str(path))),
            "--alpha",
            str(ALPHA),
            "--beta",
            str(BETA),
            "-n",
            str(N),
            "--json",
            prompt,
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.splitlines()[0])["token_ids"]
    assert len(got) == N

    with LlamaModel(roles["large_ins"][1], vocab_only=True) as m:
        ids = [int(t) for t in m.tokenize(prompt, add_bos=m.add_bos)]
    weights = {"large_ins": ALPHA, "small_cpt": BETA, "small_base": 1 - ALPHA - BETA}
    expect = []
    for _ in range(N):
        fused = sum(w * forward(roles[r][0], ids)[-1] for r, w in weights.items())
        top2 = np.sort(fused)[-2:]
        assert top2[1] - top2[0] > 1e-3, "a near tie: the test would not be decisive"
        expect.append(int(np.argmax(fused)))
        ids.append(expect[-1])
    assert got == expect
