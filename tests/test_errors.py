"""Bad input: one clear line naming the problem and the fix, from the library and from the CLI."""

from __future__ import annotations

import math

import pytest
from commands import trimix
from tinygguf import write_tiny_llama

import trimix_cpp as tm

OPTS = tm.LoadOptions(n_ctx=64, n_gpu_layers=0)


def test_missing_file(tmp_path, tiny_trio):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(tm.ModelFileError, match=r"model file not found: .*nope\.gguf"):
        tm.Engine({"large_ins": tiny_trio["large_ins"], "small_cpt": missing}, OPTS)


def test_not_a_gguf_file(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    with pytest.raises(tm.ModelFileError, match="not a GGUF file"):
        tm.Engine({"large_ins": bogus}, OPTS)


def test_truncated_gguf(tmp_path, tiny_trio):
    data = tiny_trio["large_ins"].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(tm.ModelFileError, match=r"could not load .*cut\.gguf"):
        tm.Engine({"large_ins": cut}, OPTS)


def test_vocabulary_mismatch_names_the_first_differing_id(tmp_path, tiny_trio):
    other = write_tiny_llama(tmp_path / "swapped.gguf", seed=5, swap=(300, 301))
    with pytest.raises(tm.VocabularyMismatchError) as info:
        tm.Engine({"large_ins": tiny_trio["large_ins"], "small_cpt": other}, OPTS)
    msg = str(info.value)
    assert "token id 300" in msg and "swapped.gguf" in msg and "\n" not in msg


def test_padded_vocabulary_fuses_over_shared_ids_and_never_emits_padding(tmp_path, tiny_trio):
    padded = write_tiny_llama(tmp_path / "padded.gguf", seed=6, n_pad=64)
    with tm.Engine(
        {"large_ins": padded, "small_cpt": tiny_trio["small_cpt"], "small_base": tiny_trio["small_base"]},
        tm.LoadOptions(n_ctx=256, n_gpu_layers=0),
    ) as eng:
        n_real = eng.models["small_cpt"].n_vocab
        assert eng.models["large_ins"].n_vocab == n_real + 64 and eng.vocab.n_vocab == n_real
        for seed in range(5):
            gen = eng.generate(
                "the",
                tm.plan("trimix", alpha=0.5, beta=0.3),
                sampling=tm.SamplingParams(temperature=3.0, seed=seed),
                max_tokens=40,
            ).run()
            assert max(gen.token_ids) < n_real
    # padding inside the shared range is banned too
    with tm.Engine({"large_ins": padded}, tm.LoadOptions(n_ctx=256, n_gpu_layers=0)) as eng:
        assert eng.vocab.banned[-64:].all() and eng.vocab.banned[0]  # [PAD...] and <unk>


def test_prompt_longer_than_context(tiny_trio):
    with tm.Engine({"large_ins": tiny_trio["large_ins"]}, OPTS) as eng:
        with pytest.raises(
            tm.ContextOverflowError, match=r"prompt is \d+ tokens but the context holds \d+ \(raise n_ctx"
        ):
            eng.generate("the cat " * 100, tm.plan("single")).run()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "abc"])
def test_non_finite_weights(bad):
    with pytest.raises(tm.WeightError, match="alpha"):
        tm.plan("trimix", alpha=bad, beta=0.5)


def test_unknown_method():
    with pytest.raises(tm.WeightError, match="unknown method"):
        tm.plan("bogus")


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,needle",
    [
        (["--alpha", "nan", "--beta", "0.5"], "alpha must be a finite number"),
        (["--alpha", "0.1"], "--beta is required"),
        (["--alpha", "0.1", "--beta", "0.9", "--n-ctx", "16", "--prompt-long"], "tokens but the context holds"),
        (["--method", "proxy"], "needs --large-ins"),
    ],
)
def test_cli_errors_are_one_line(tiny_trio, args, needle):
    prompt = "the cat " * 300 if "--prompt-long" in args else "the cat"
    args = [a for a in args if a != "--prompt-long"]
    models = [
        "--large-ins",
        str(tiny_trio["large_ins"]),
        "--small-cpt",
        str(tiny_trio["small_cpt"]),
        "--small-base",
        str(tiny_trio["small_base"]),
    ]
    if "--method" in args:
        models = models[2:]
    r = trimix("generate", *models, *args, prompt)
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert r.stdout == b""


@pytest.mark.slow
def test_cli_missing_model_and_invalid_utf8(tmp_path, tiny_trio):
    r = trimix("generate", "--method", "single", "--large-ins", str(tmp_path / "x.gguf"), "hi")
    assert r.returncode == 1 and "model file not found" in r.stderr.decode()
    r = trimix("generate", "--method", "single", "--large-ins", str(tiny_trio["large_ins"]), "-", stdin=b"ab\xff\xfe")
    err = r.stderr.decode()
    assert r.returncode == 1 and "not valid UTF-8 (byte 0xff at offset 2)" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_verbose_shows_traceback(tmp_path):
    r = trimix("generate", "--method", "single", "--large-ins", str(tmp_path / "x.gguf"), "--verbose", "hi")
    assert r.returncode == 1 and "Traceback" in r.stderr.decode()
