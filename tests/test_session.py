"""A conversation's prefix stays in the KV cache: each turn evaluates only its new tokens, and
perplexity selection still covers the whole prompt (the kept per-position sums plus the new ones
equal a full evaluation's)."""

from __future__ import annotations

import numpy as np
import pytest

import trimix_cpp as tm
from trimix_cpp.selection import SELECTION_ROLES

OPTS = dict(n_ctx=512, n_gpu_layers=0, n_threads=1)


@pytest.fixture(scope="module")
def eng(tiny_trio):
    with tm.Engine({r: tiny_trio[r] for r in SELECTION_ROLES}, tm.LoadOptions(**OPTS, n_seq=2)) as e:
        yield e


def _text(eng: tm.Engine, text: str) -> np.ndarray:
    return eng.models[eng.reference_role].tokenize(text, add_bos=False)


def _full(eng: tm.Engine, prompt: np.ndarray, fusion, **kw) -> tm.Generation:
    """The same request evaluated from scratch, without a session."""
    return eng.generate(prompt, fusion, **kw).run()


def test_next_turn_reuses_the_prefix_and_selects_as_a_full_evaluation(eng):
    sel = tm.Selector("ppl")
    p1 = eng.tokenize("a first message of the conversation")
    with eng.session() as s:
        g1 = eng.generate(p1, sel, max_tokens=6, session=s).run()
        assert g1.timings.cached_tokens == 0
        assert len(s.tokens) == len(p1) + len(g1.token_ids)
        p2 = np.concatenate([p1, np.asarray(g1.token_ids, np.int32), _text(eng, " and the second turn")])
        decoded = {r: m.n_decoded for r, m in eng.models.items()}
        g2 = eng.generate(p2, sel, max_tokens=6, session=s).run()
        new = len(p2) - g2.timings.cached_tokens
        # only what the second turn adds (and the reply's last token, never decoded) is evaluated
        assert new <= len(p2) - len(p1) - len(g1.token_ids) + 1
        for r, m in eng.models.items():
            assert m.n_decoded - decoded[r] <= new + len(g2.token_ids), r
        full = eng.select(p2, sel)
        assert g2.selection is not None and g2.selection.n_tokens == len(p2)
        np.testing.assert_allclose(g2.selection.scores, full.scores, rtol=0, atol=1e-6)
        for r, v in full.single_nll.items():
            assert g2.selection.single_nll[r] == pytest.approx(v, abs=1e-6)
        assert g2.selection.chosen == full.chosen
        assert g2.token_ids == _full(eng, p2, sel, max_tokens=6).token_ids


def test_a_prompt_that_diverges_part_way_reuses_what_it_shares(eng):
    sel = tm.Selector("ppl")
    p1 = eng.tokenize("one two three four five six seven eight")
    with eng.session() as s:
        eng.generate(p1, sel, max_tokens=4, session=s).run()
        p2 = np.concatenate([p1[:5], _text(eng, " something else entirely")])
        g2 = eng.generate(p2, sel, max_tokens=4, session=s).run()
        assert 0 < g2.timings.cached_tokens <= 4
        np.testing.assert_allclose(g2.selection.scores, eng.select(p2, sel).scores, rtol=0, atol=1e-6)
        # another grid: its rows start from scratch, the cells are still reused
        other = tm.Selector("ppl", alphas=(0.2, 0.6), betas=(0.4, 0.8))
        p3 = np.concatenate([p2, _text(eng, " more")])
        g3 = eng.generate(p3, other, max_tokens=3, session=s).run()
        np.testing.assert_allclose(g3.selection.scores, eng.select(p3, other).scores, rtol=0, atol=1e-6)
        # a fixed-weight turn in between, then the same selection again: its rows resume where they stopped
        fixed = tm.plan("trimix", alpha=0.5, beta=0.5)
        g4 = eng.generate(np.concatenate([p3, _text(eng, " fixed")]), fixed, max_tokens=3, session=s).run()
        assert g4.token_ids == _full(eng, g4.prompt_tokens, fixed, max_tokens=3).token_ids
        p5 = np.concatenate([g4.prompt_tokens, np.asarray(g4.token_ids, np.int32), _text(eng, " last")])
        g5 = eng.generate(p5, other, max_tokens=3, session=s).run()
        assert g5.timings.cached_tokens >= len(p3) - 1
        np.testing.assert_allclose(g5.selection.scores, eng.select(p5, other).scores, rtol=0, atol=1e-6)


def test_a_stopped_reply_stays_in_the_cache(eng):
    fixed = tm.plan("trimix", alpha=0.3, beta=0.7)
    p1 = eng.tokenize("stop me part way")
    with eng.session() as s:
        g = eng.generate(p1, fixed, max_tokens=40, session=s)
        while len(g.token_ids) < 5:
            eng.scheduler.step()
        g.close()
        assert g.finish_reason == "cancelled"
        assert s.tokens.tolist() == [*p1.tolist(), *g.token_ids]
        p2 = np.concatenate([s.tokens, _text(eng, " go on")])
        g2 = eng.generate(p2, fixed, max_tokens=3, session=s).run()
        assert g2.timings.cached_tokens >= len(p1) + len(g.token_ids) - 1
        assert g2.token_ids == _full(eng, p2, fixed, max_tokens=3).token_ids


def test_sessions_hold_a_sequence_until_closed(eng):
    a, b = eng.session(), eng.session()
    with pytest.raises(tm.TrimixError, match="no free sequence"):
        eng.session()
    g = eng.generate(eng.tokenize("busy"), tm.plan("single"), max_tokens=20, session=a)
    with pytest.raises(tm.TrimixError, match="still generating"):
        eng.generate(eng.tokenize("again"), tm.plan("single"), session=a)
    with pytest.raises(tm.TrimixError, match="draft"):
        eng.generate(eng.tokenize("x"), tm.plan("trimix", alpha=0.5, beta=0.5), draft=2, session=b)
    a.close()  # cancels its reply and frees its cells
    assert g.finish_reason == "cancelled"
    b.close()
    assert eng.scheduler.cells_free == eng.scheduler.kv_cells
    with eng.session() as c:
        assert eng.generate(eng.tokenize("after"), tm.plan("single"), max_tokens=2, session=c).run().token_ids
    with pytest.raises(tm.TrimixError, match="closed"):
        eng.generate(eng.tokenize("late"), tm.plan("single"), session=c)
    # without sessions, both sequences are free again
    gens = [eng.generate(eng.tokenize(t), tm.plan("single"), max_tokens=2) for t in ("p", "q")]
    eng.run(gens)
    assert all(g.finish_reason in ("length", "eog") for g in gens)


@pytest.mark.slow
def test_a_chat_on_the_demo_trio_selects_as_a_full_evaluation():
    """Real quantized models through the chat template. llama.cpp computes the logits of a decode of
    64 tokens or more with other kernels than a smaller one (SmolLM2 Q4_1: up to 0.74 apart for the
    same tokens), so both sides here keep every decode under 64 tokens (a small --max-logits-mib),
    as any two evaluations must to be comparable. Below that, the attention of a cache per sequence
    (no flash attention, see _llama.LlamaModel) still rounds a one-token decode differently from a
    decode of several tokens: the reply's cells, decoded one at a time in the session, differ from the
    same tokens evaluated together, which moves the grid's mean NLL by up to about 1.3e-3 (measured;
    0.03 % of it). The scores are compared within 5e-3, and the choice where its margin is wider."""
    from trimix_cpp.chat_template import chat_format
    from trimix_cpp.conversation import ChatSettings, Conversation
    from trimix_cpp.methods import MethodChoice
    from trimix_cpp.modelset import ModelSet

    modelset = ModelSet.make("demo")
    paths = modelset.paths(SELECTION_ROLES, "the test")
    sel = tm.Selector("ppl", max_logits_mib=16)
    with tm.Engine(paths, modelset.load_options(n_ctx=512, threads=1, n_gpu_layers=0)) as eng:
        assert sel.chunk_rows(eng.vocab.n_vocab, [m.n_vocab for m in eng.models.values()], 512) < 64
        settings = ChatSettings(MethodChoice(select="ppl", max_logits_mib=16), max_tokens=10, stop=("\n",))
        conv = Conversation(eng, chat_format(eng, None), settings, modelset.profile)
        try:
            for i, text in enumerate(["Salam! What is your name?", "Tell me more.", "Thank you."]):
                turn = conv.ask(text)
                gen = turn.generation.run()
                conv.commit(turn)
                if i:
                    assert gen.timings.cached_tokens > len(gen.prompt_tokens) // 2
                full = eng.select(gen.prompt_tokens, sel)
                np.testing.assert_allclose(gen.selection.scores, full.scores, rtol=0, atol=5e-3)
                ranked = np.sort(np.asarray(full.scores).ravel())
                if ranked[1] - ranked[0] > 1e-2:
                    assert gen.selection.chosen == full.chosen
        finally:
            conv.close()
