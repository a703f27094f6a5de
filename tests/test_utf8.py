"""Whole characters, and a byte stream that stays valid UTF-8 under the guard."""

from __future__ import annotations

import codecs

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trimix_cpp as tm
from trimix_cpp.utf8 import ACCEPT, REJECT, StreamDecoder, transition_table


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _python_prefix_ok(data: bytes) -> bool:
    """Is ``data`` valid UTF-8 or a valid prefix of it? Python's own decoder is the oracle: some
    completion of at most three continuation bytes must decode. (Its incremental decoder alone is
    not enough: it accepts ED A0, a surrogate's start, until the third byte arrives.)"""
    if _decodes(data):
        return True
    if not _python_incremental_ok(data):
        return False
    return any(_decodes(data + bytes([first]) + b"\x80" * (k - 1)) for k in (1, 2, 3) for first in range(0x80, 0xC0))


def _python_incremental_ok(data: bytes) -> bool:
    dec = codecs.getincrementaldecoder("utf-8")(errors="strict")
    try:
        dec.decode(data, final=False)
        return True
    except UnicodeDecodeError:
        return False


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=4), min_size=1, max_size=8))
def test_transition_table_agrees_with_pythons_decoder(chunks):
    table = transition_table(chunks)
    state = ACCEPT
    emitted = b""
    for i, chunk in enumerate(chunks):
        nxt = int(table[state, i])
        ok = _python_prefix_ok(emitted + chunk)
        assert (nxt != REJECT) == ok, (emitted, chunk)
        if not ok:
            break
        emitted += chunk
        state = nxt
    else:
        complete = state == ACCEPT
        try:
            emitted.decode("utf-8")
            assert complete
        except UnicodeDecodeError:
            assert not complete


def test_stream_decoder_emits_whole_characters_only():
    text = "བོད་ཡིག ئۇيغۇرچە"
    data = text.encode()
    dec = StreamDecoder()
    pieces = [dec.feed(data[i : i + 1]) for i in range(len(data))]
    assert "".join(pieces) + dec.flush() == text
    assert all("\ufffd" not in p for p in pieces)
    # a character split over three one-byte feeds appears only with its last byte
    tsheg = "་".encode()
    dec = StreamDecoder()
    assert [dec.feed(tsheg[:1]), dec.feed(tsheg[1:2]), dec.feed(tsheg[2:])] == ["", "", "་"]


@pytest.fixture(scope="module")
def engine(tiny_trio):
    roles = ("large_ins", "small_cpt", "small_base")
    with tm.Engine({r: tiny_trio[r] for r in roles}, tm.LoadOptions(n_ctx=256, n_gpu_layers=0)) as eng:
        yield eng


def _generated_bytes(eng: tm.Engine, ids: list[int]) -> bytes:
    return b"".join(eng.vocab.pieces[t] for t in ids)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1))
def test_guarded_sampling_at_temperature_2_is_valid_utf8(engine, seed):
    fusion = tm.plan("proxy", beta=1.0)  # Proxy Tuning: the method the paper saw break UTF-8
    gen = engine.generate("ཀག་ ئۇ", fusion, sampling=tm.SamplingParams(temperature=2.0, seed=seed), max_tokens=48)
    pieces = list(gen)
    assert "".join(pieces) == gen.text
    data = _generated_bytes(engine, gen.token_ids)
    if gen.finish_reason == "eog":
        assert data.decode("utf-8") == gen.text  # strict: raises on any invalid byte
    else:
        assert _python_prefix_ok(data)
        assert data.decode("utf-8", errors="ignore") == gen.text
    assert "\ufffd" not in gen.text


def test_without_the_guard_the_same_sampling_breaks_utf8(engine):
    """The control experiment: the guard is what keeps the stream valid, not luck."""
    fusion = tm.plan("proxy", beta=1.0)
    broken = 0
    for seed in range(10):
        gen = engine.generate(
            "ཀག་", fusion, sampling=tm.SamplingParams(temperature=2.0, seed=seed), max_tokens=48, utf8_guard=False
        ).run()
        if not _python_prefix_ok(_generated_bytes(engine, gen.token_ids)):
            broken += 1
            assert "\ufffd" in gen.text
    assert broken > 0


def test_guard_tables_mask_what_utf8_forbids(engine):
    guard = engine.guard(True)
    assert guard.penalty.shape == (8, engine.vocab.n_vocab) and guard.penalty.dtype == np.float32
    cont = int(np.flatnonzero([p == b"\x80" for p in engine.vocab.pieces])[0])
    assert guard.penalty[ACCEPT, cont] == -np.inf  # a lone continuation byte never starts text
    e0 = int(np.flatnonzero([p == b"\xe0" for p in engine.vocab.pieces])[0])
    state = guard.advance(ACCEPT, e0)  # after E0 only A0..BF may follow
    assert guard.penalty[state, cont] == -np.inf
    a0 = int(np.flatnonzero([p == b"\xa0" for p in engine.vocab.pieces])[0])
    assert guard.penalty[state, a0] == 0.0
    assert guard.penalty[state, engine.tokenize("a")[-1]] == -np.inf


def test_same_seed_same_output_and_streamed_pieces_join(engine):
    s = tm.SamplingParams(temperature=1.3, top_k=40, top_p=0.95, seed=7)
    a = engine.generate("the cat", tm.plan("trimix", alpha=0.3, beta=0.6), sampling=s, max_tokens=30)
    pieces = list(a)
    b = engine.generate("the cat", tm.plan("trimix", alpha=0.3, beta=0.6), sampling=s, max_tokens=30).run()
    assert a.token_ids == b.token_ids and "".join(pieces) == a.text == b.text
    c = engine.generate(
        "the cat",
        tm.plan("trimix", alpha=0.3, beta=0.6),
        sampling=tm.SamplingParams(temperature=1.3, top_k=40, top_p=0.95, seed=8),
        max_tokens=30,
    ).run()
    assert c.token_ids != a.token_ids


@pytest.mark.slow
def test_gemma_tibetan_sampling_is_valid_utf8(gemma):
    """Gemma 3 spells Mongolian script partly in byte-fallback tokens: the guard keeps hot sampling valid."""
    roles = ("large_ins", "small_cpt", "small_base")
    with tm.Engine({r: gemma for r in roles}, tm.LoadOptions(n_ctx=256)) as eng:
        for seed in range(3):
            gen = eng.generate(
                "ᠮᠣᠩᠭᠣᠯ ᠪᠢᠴᠢᠭ ", tm.plan("proxy"), sampling=tm.SamplingParams(temperature=2.0, seed=seed), max_tokens=24
            )
            pieces = list(gen)
            assert "".join(pieces) == gen.text and "\ufffd" not in gen.text
            assert _python_prefix_ok(b"".join(eng.vocab.pieces[t] for t in gen.token_ids))


def test_contrastive_with_guard_never_dead_ends(engine):
    """Plausibility can keep only bytes the guard forbids; the constraint is relaxed, not the guard."""
    paths = {r: engine.models[r].path for r in ("small_cpt", "small_base")}
    with tm.Engine(paths, tm.LoadOptions(n_ctx=256, n_gpu_layers=0)) as eng:
        for i in range(6):
            gen = eng.generate(f"English: the cat {i}\nUyghur:", tm.plan("contrastive"), max_tokens=8).run()
            assert len(gen.token_ids) == 8
            assert _python_prefix_ok(_generated_bytes(eng, gen.token_ids))
