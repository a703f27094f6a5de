"""Many sequences per model: batched logits, shared prompts, independent generations, batch files.

llama.cpp's logits of a token can differ slightly with the batch it is decoded in (the order of
float additions changes with the batch layout). Measured here on the CPU build: 0.0 for SmolLM2
and the tiny models with the layouts below (a token decoded alone and in a batch of four other
sequences give identical logits); the tests still allow ``LAYOUT_NOISE`` and compare greedy
outputs only up to the first step whose top-two fused margin is within that noise.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from commands import trimix

import trimix_cpp as tm
from trimix_cpp._llama import LlamaModel
from trimix_cpp.engine import SeqSpec
from trimix_cpp.errors import flag

TRIO = ("large_ins", "small_cpt", "small_base")
LAYOUT_NOISE = 1e-3

PLANS = {
    "large-ins": tm.plan("single"),
    "small-cpt": tm.plan("single", role="small_cpt"),
    "proxy": tm.plan("proxy"),
    "contrastive": tm.plan("contrastive"),
    "trimix@0.1:0.9": tm.plan("trimix", alpha=0.1, beta=0.9),
    "trimix@0.5:0.3": tm.plan("trimix", alpha=0.5, beta=0.3),
    "trimix@1:1": tm.plan("trimix", alpha=1.0, beta=1.0),
}


def opts(n_seq: int = 1, n_ctx: int = 256, **kw) -> tm.LoadOptions:
    return tm.LoadOptions(n_ctx=n_ctx, n_gpu_layers=0, n_seq=n_seq, **kw)


def test_llama_layer_sequences_share_a_prompt_and_undo(smollm2):
    with LlamaModel(smollm2, n_ctx=128, n_seq=4, kv_cells=512, n_gpu_layers=0, isolated=False) as m:
        t = m.tokenize("The capital of France is", add_bos=m.add_bos)
        alone = []
        for nxt in (11, 12, 13):
            m.clear()
            m.decode(t)
            m.decode_one(nxt)
            alone.append(m.logits_row(-1).copy())
        m.clear()
        m.decode_batch(t, np.arange(len(t), dtype=np.int32), 0, 0)
        for s in (1, 2):
            m.seq_cp(0, s)
        m.decode_batch(np.array([11, 12, 13], dtype=np.int32), len(t), np.array([0, 1, 2]), 1)
        rows = m.logits_rows(3)
        for k in range(3):
            assert np.abs(rows[k] - alone[k]).max() <= LAYOUT_NOISE
        assert [m.seq_pos_max(s) for s in (0, 1, 2, 3)] == [len(t)] * 3 + [-1]
        m.seq_rm(1, len(t), -1)  # undo the last token of one sequence only
        assert m.seq_pos_max(1) == len(t) - 1 and m.seq_pos_max(0) == len(t)


def _record_fused(engine: tm.Engine):
    seen: dict[int, list[tuple[dict[str, np.ndarray], np.ndarray]]] = {}

    def observe(gen, rows, fused):
        n = engine.vocab.n_vocab
        seen.setdefault(id(gen), []).append(
            ({r: x[:n].astype(np.float64) for r, x in rows.items()}, fused.astype(np.float64))
        )

    engine.scheduler.observer = observe
    return seen


def test_batched_fusion_is_each_models_logits_weighted_per_sequence(tiny_trio):
    with tm.Engine({r: tiny_trio[r] for r in TRIO}, opts(n_seq=len(PLANS))) as eng:
        seen = _record_fused(eng)
        gens = eng.generate_many("the cat", [SeqSpec(p, max_tokens=6) for p in PLANS.values()])
        eng.run(gens)
        for gen, p in zip(gens, PLANS.values()):
            if id(gen) not in seen:  # proxy and trimix@1:1 are the same weights: one sequence serves both
                twin = next(g for g, q in zip(gens, PLANS.values()) if q.weights == p.weights and id(g) in seen)
                assert gen.token_ids == twin.token_ids
                continue
            steps = seen[id(gen)]
            assert len(steps) >= 1
            for rows, fused in steps:
                expect = sum(w * rows[r] for r, w in p.weights.items())
                if p.plausibility_role:
                    gate = rows[p.plausibility_role]
                    expect = np.where(gate >= gate.max() + np.log(0.1), expect, -np.inf)
                finite = np.isfinite(expect)
                assert np.array_equal(finite, np.isfinite(fused))
                np.testing.assert_allclose(fused[finite], expect[finite], atol=1e-4)


def _margin_limited(tokens: list[int], margins: list[float]) -> int:
    """How many leading tokens are decided by more than the layout noise."""
    for k, m in enumerate(margins):
        if m <= LAYOUT_NOISE:
            return k
    return len(tokens)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_greedy_batch_equals_one_at_a_time(which, tiny_trio, smollm2):
    paths = {r: tiny_trio[r] for r in TRIO} if which == "tiny" else {r: smollm2 for r in TRIO}
    prompt = "the cat sat" if which == "tiny" else "The history of the Uyghur language"
    alone: dict[str, tuple[list[int], list[float]]] = {}
    with tm.Engine(paths, opts()) as eng:
        for name, p in PLANS.items():
            margins: list[float] = []

            def observe(gen, rows, fused, margins=margins):
                top = np.sort(fused[np.isfinite(fused)])[-2:]
                margins.append(float(top[-1] - top[0]) if len(top) == 2 else np.inf)

            eng.scheduler.observer = observe
            gen = eng.generate(prompt, p, max_tokens=12).run()
            alone[name] = (gen.token_ids, margins)
    with tm.Engine(paths, opts(n_seq=len(PLANS))) as eng:
        gens = eng.generate_many(prompt, [SeqSpec(p, max_tokens=12) for p in PLANS.values()])
        eng.run(gens)
    for name, gen in zip(PLANS, gens):
        tokens, margins = alone[name]
        k = _margin_limited(tokens, margins)
        assert k >= 4, f"{name}: prompt too close to a tie to compare"
        assert gen.token_ids[:k] == tokens[:k], name


def test_interleaved_generations_equal_each_alone(tiny_trio):
    paths = {r: tiny_trio[r] for r in TRIO}
    fusion = tm.plan("trimix", alpha=0.3, beta=0.6)
    sampled = tm.SamplingParams(temperature=1.5, seed=4)
    with tm.Engine(paths, opts()) as eng:
        a_alone = eng.generate("the cat", fusion, max_tokens=16).run().text
        b_alone = eng.generate("ཀག་", fusion, sampling=sampled, max_tokens=16).run().text
    for n_seq in (1, 2):  # one sequence: the second waits for the first; two: side by side
        with tm.Engine(paths, opts(n_seq=n_seq)) as eng:
            a = eng.generate("the cat", fusion, max_tokens=16)
            b = eng.generate("ཀག་", fusion, sampling=sampled, max_tokens=16)
            texts, live = ["", ""], [a, b]
            while any(live):  # one piece of each in turn
                for k, g in enumerate(live):
                    if g is not None:
                        piece = next(g, None)
                        if piece is None:
                            live[k] = None
                        else:
                            texts[k] += piece
            a_text, b_text = texts
        assert (a_text, b_text) == (a_alone, b_alone) == (a.text, b.text)


def test_a_shared_prompt_is_evaluated_once(tiny_trio):
    with tm.Engine({r: tiny_trio[r] for r in TRIO}, opts(n_seq=len(PLANS))) as eng:
        before = {r: m.n_decoded for r, m in eng.models.items()}
        prompt = eng.tokenize("the cat sat on the mat")
        gens = eng.generate_many(prompt, [SeqSpec(p, max_tokens=1) for p in PLANS.values()])
        eng.run(gens)
        used = {r: eng.models[r].n_decoded - before[r] for r in TRIO}
    assert used == {r: len(prompt) for r in TRIO}  # one token each: the first is picked from the prompt


def test_selection_per_prompt_inside_a_batch(tiny_trio):
    with tm.Engine({r: tiny_trio[r] for r in TRIO}, opts(n_seq=3)) as eng:
        alone = eng.select("the cat sat on the mat", tm.Selector("ppl"))
        fixed = eng.generate(
            "the cat sat on the mat", tm.plan("trimix", alpha=alone.chosen[0], beta=alone.chosen[1]), max_tokens=8
        ).run()
        gens = eng.generate_many(
            "the cat sat on the mat",
            [SeqSpec(tm.Selector("ppl"), max_tokens=8), SeqSpec(tm.Selector("ent"), max_tokens=8)],
        )
        eng.run(gens)
    assert gens[0].selection.chosen == alone.chosen and gens[0].token_ids == fixed.token_ids
    assert gens[1].selection.strategy == "ent"


def test_more_sequences_than_parallel_and_a_full_cache(tiny_trio):
    with tm.Engine({"large_ins": tiny_trio["large_ins"]}, opts(n_seq=2, n_ctx=64)) as eng:
        with pytest.raises(tm.TrimixError, match=r"needs 3 sequences but the engine holds 2 \(raise n_seq\)") as e:
            eng.generate_many("the cat", [SeqSpec(tm.plan("single"))] * 3)
        assert e.value.render(flag).endswith("(raise --parallel)")
    with tm.Engine({"large_ins": tiny_trio["large_ins"]}, opts(n_seq=2, n_ctx=64, kv_cells=64, isolated=False)) as eng:
        with pytest.raises(tm.TrimixError, match=r"needs \d+ KV cells .* but the cache holds 64 \(raise n_ctx"):
            eng.generate_many("the cat", [SeqSpec(tm.plan("single"), max_tokens=60)] * 2)
        # two requests that each fit but not together: the second waits, then runs
        gens = eng.generate_batch(["the cat", "a dog"], SeqSpec(tm.plan("single"), max_tokens=28))
        eng.run(gens)
        assert [g.finish_reason for g in gens] == ["length", "length"]
        assert gens[1].timings.queued_s > 0


@pytest.mark.slow
def test_cli_batch_file(tiny_trio, tmp_path):
    args = [f"--{r.replace('_', '-')}={tiny_trio[r]}" for r in TRIO] + ["--alpha", "0.3", "--beta", "0.6"]
    prompts = ["the cat", "ཀག་", "a dog sat", "the end"]
    single = [json.loads(trimix("generate", *args, "-n", "6", "--json", p).stdout) for p in prompts[:2]]
    txt = tmp_path / "prompts.txt"
    txt.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    r = trimix("generate", *args, "-n", "6", "--batch", str(txt), "--parallel", "3")
    assert r.returncode == 0, r.stderr.decode()
    rows = [json.loads(x) for x in r.stdout.decode().splitlines()]
    assert [x["line"] for x in rows] == [1, 2, 3, 4]
    for got, want in zip(rows, single):
        assert set(want) <= set(got)
        assert got["token_ids"] == want["token_ids"] and got["text"] == want["text"]
    jl = tmp_path / "prompts.jsonl"
    jl.write_text(
        "\n".join(
            [
                json.dumps({"prompt": "the cat", "max_tokens": 3}),
                "{not json",
                json.dumps({"prompt": "a dog", "temperature": 0.9, "seed": 2}),
                json.dumps({"prompt": "x", "max_tokens": -1}),
                json.dumps({"text": "no prompt"}),
            ]
        ),
        encoding="utf-8",
    )
    r = trimix("generate", *args, "--batch", str(jl))
    assert r.returncode == 1
    rows = [json.loads(x) for x in r.stdout.decode().splitlines()]
    assert [x["line"] for x in rows] == [1, 2, 3, 4, 5]
    assert len(rows[0]["token_ids"]) == 3 and rows[2]["finish_reason"] in ("length", "eog")
    assert "prompts.jsonl:2: not valid JSON" in rows[1]["error"]
    assert "prompts.jsonl:4: --max-tokens must be a whole number" in rows[3]["error"]
    assert 'prompts.jsonl:5: no "prompt"' in rows[4]["error"]
    errs = r.stderr.decode().splitlines()
    assert sum(line.startswith("error:") for line in errs) == 3
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    r = trimix("generate", *args, "--batch", str(empty))
    assert r.returncode == 1 and "has no prompts" in r.stderr.decode() and r.stdout == b""
    r = trimix("generate", *args, "--parallel", "2", "the cat")
    assert r.returncode == 1 and "--parallel sets how many --batch prompts" in r.stderr.decode()


def test_equal_settings_share_one_sequence(tiny_trio):
    with tm.Engine({r: tiny_trio[r] for r in TRIO}, opts(n_seq=3)) as eng:
        fixed = tm.plan("trimix", alpha=0.3, beta=0.6)
        before = {r: m.n_decoded for r, m in eng.models.items()}
        gens = eng.generate_many("the cat", [SeqSpec(fixed, max_tokens=6), SeqSpec(fixed, max_tokens=6)])
        eng.run(gens)
        used = {r: eng.models[r].n_decoded - before[r] for r in TRIO}
        alone = eng.generate("the cat", fixed, max_tokens=6).run()
    n_prompt = len(gens[0].prompt_tokens)
    assert used == {r: n_prompt + 5 for r in TRIO}  # one sequence decoded, not two
    assert gens[0].token_ids == gens[1].token_ids == alone.token_ids and gens[1].text == alone.text


@pytest.mark.slow
def test_eval_all_methods_in_one_batch_equal_one_method_at_a_time(tiny_trio, tmp_path):
    task = tmp_path / "task.jsonl"
    rows = [{"id": f"q{i}", "input": f"the cat {w}:", "gold": w} for i, w in enumerate(["sat", "ran", "ཀག"])]
    task.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    methods = [
        "large-ins",
        "small-cpt",
        "small-base",
        "proxy",
        "contrastive",
        "trimix-ppl",
        "trimix-ent",
        "trimix@0.1:0.9",
    ]
    common = [str(task), *[f"--{r.replace('_', '-')}={tiny_trio[r]}" for r in TRIO], "-n", "6", "--n-ctx", "256"]
    common += ["--grid-alpha", "0.1,0.5", "--grid-beta", "0.5,0.9"]

    def predictions(out):
        lines = (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
        return {(r["id"], r["method"]): r["output"] for r in map(json.loads, lines)}

    together = tmp_path / "together"
    r = trimix("eval", *common, "--methods", ",".join(methods), "--out", str(together))
    assert r.returncode == 0, r.stderr.decode()
    batched = predictions(together)
    for m in methods:
        out = tmp_path / m.replace("@", "_").replace(":", "_")
        r = trimix("eval", *common, "--methods", m, "--out", str(out))
        assert r.returncode == 0, r.stderr.decode()
        for key, text in predictions(out).items():
            assert batched[key] == text, key


def test_sequences_that_agree_decode_once_between_them(tiny_trio):
    """Logits depend on the tokens, not on the weights that chose them: sequences with the same tokens
    so far share one decode per model, and fork when they disagree."""
    grid = [(a, b) for a in (0.1, 0.3, 0.5) for b in (0.5, 0.7, 0.9)]
    with tm.Engine({r: tiny_trio[r] for r in TRIO}, opts(n_seq=len(grid))) as eng:
        before = {r: m.n_decoded for r, m in eng.models.items()}
        specs = [SeqSpec(tm.plan("trimix", alpha=a, beta=b), max_tokens=8) for a, b in grid]
        gens = eng.generate_many("the cat sat", specs)
        eng.run(gens)
        used = {r: eng.models[r].n_decoded - before[r] for r in TRIO}
        alone = [eng.generate("the cat sat", sp.fusion, max_tokens=8).run().token_ids for sp in specs]
    assert [g.token_ids for g in gens] == alone
    # every distinct prefix that was continued was decoded exactly once
    prefixes = {tuple(g.token_ids[:k]) for g in gens for k in range(1, len(g.token_ids))}
    n_prompt = len(gens[0].prompt_tokens)
    assert used == {r: n_prompt + len(prefixes) for r in TRIO}
    assert len(prefixes) < sum(len(g.token_ids) - 1 for g in gens)  # some of them agreed for a while
