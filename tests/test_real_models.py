"""The published models: SmolLM2-135M-Instruct (49,152 BPE) and Gemma 3 270M (262,144 SPM)."""

from __future__ import annotations

import json

import pytest
from commands import trimix

import trimix_cpp as tm

pytestmark = pytest.mark.slow  # every test here takes over a second (see README, Tests)

PROMPT = "The capital of France is"


def test_identical_smollm2_trio_equals_single_model_through_the_cli(smollm2):
    trio = ["--large-ins", str(smollm2), "--small-cpt", str(smollm2), "--small-base", str(smollm2)]
    common = ["-n", "24", "--n-ctx", "256", "--json", PROMPT]
    single = json.loads(trimix("generate", "--method", "single", "--large-ins", str(smollm2), *common).stdout)
    for a, b in [(0.1, 0.9), (0.3, 0.5), (0.5, 0.5)]:
        r = trimix("generate", *trio, "--alpha", str(a), "--beta", str(b), *common)
        assert r.returncode == 0, r.stderr.decode()
        fused = json.loads(r.stdout)
        assert fused["token_ids"] == single["token_ids"], (a, b)
        assert fused["text"] == single["text"]
    assert len(single["token_ids"]) > 5 and "Paris" in single["text"]


def test_identical_gemma_trio_equals_single_model_on_tibetan(gemma):
    prompt = "བོད་ནི་ ᠮᠣᠩᠭᠣᠯ"
    with tm.Engine({r: gemma for r in ("large_ins", "small_cpt", "small_base")}, tm.LoadOptions(n_ctx=128)) as eng:
        assert eng.vocab.n_vocab == 262144
        single = eng.generate(prompt, tm.plan("single"), max_tokens=16).run()
        fused = eng.generate(prompt, tm.plan("trimix", alpha=0.11, beta=0.91), max_tokens=16).run()
        assert fused.token_ids == single.token_ids and fused.text == single.text
        # Gemma has Tibetan letters but spells Mongolian script partly in byte-fallback tokens
        byte_tokens = [
            t for t in eng.tokenize(prompt) if len(eng.vocab.pieces[t]) == 1 and eng.vocab.pieces[t][0] >= 0x80
        ]
        assert byte_tokens
