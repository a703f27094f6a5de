"""The command line end to end: JSON contract, streaming, stop strings, inspect."""

from __future__ import annotations

import json

import pytest
from commands import trimix

from trimix_cli.main import unescape


def _trio_args(trio) -> list[str]:
    return [
        "--large-ins",
        str(trio["large_ins"]),
        "--small-cpt",
        str(trio["small_cpt"]),
        "--small-base",
        str(trio["small_base"]),
    ]


@pytest.mark.slow
def test_json_contract(tiny_trio):
    r = trimix(
        "generate",
        *_trio_args(tiny_trio),
        "--alpha",
        "0.1",
        "--beta",
        "0.9",
        "-n",
        "12",
        "--json",
        "--n-ctx",
        "128",
        "the cat",
    )
    assert r.returncode == 0, r.stderr.decode()
    lines = r.stdout.decode().strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert isinstance(out["text"], str)
    assert isinstance(out["token_ids"], list) and all(isinstance(t, int) for t in out["token_ids"])
    assert out["method"] == "trimix"
    assert out["weights"] == pytest.approx({"large_ins": 0.1, "small_cpt": 0.9, "small_base": 0.0})
    assert out["timings"]["prompt_tokens_per_s"] > 0 and out["timings"]["gen_tokens_per_s"] > 0
    assert len(out["token_ids"]) == 12


@pytest.mark.slow
def test_streamed_text_equals_json_text(tiny_trio):
    common = [
        *_trio_args(tiny_trio),
        "--method",
        "proxy",
        "-n",
        "20",
        "--n-ctx",
        "128",
        "--temperature",
        "1.5",
        "--seed",
        "3",
    ]
    js = json.loads(trimix("generate", *common, "--json", "ཀག").stdout)
    plain = trimix("generate", *common, "ཀག")
    assert plain.returncode == 0
    assert plain.stdout.decode() == js["text"] + "\n"
    assert "tok/s" in plain.stderr.decode()


@pytest.mark.slow
def test_stop_string_from_the_command_line(tiny_trio):
    base = [*_trio_args(tiny_trio), "--alpha", "0.3", "--beta", "0.6", "-n", "40", "--n-ctx", "128", "--json"]
    full = json.loads(trimix("generate", *base, "the").stdout)["text"]
    assert len(full) > 6
    stop = full[3:5]
    cut = json.loads(trimix("generate", *base, "--stop", stop, "the").stdout)
    assert cut["text"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"


def test_unescape_reads_backslash_sequences():
    assert unescape("\\n") == "\n" and unescape("a\\tb") == "a\tb" and unescape("\\\\n") == "\\n"
    assert unescape("་\\n") == "་\n"


@pytest.mark.slow
def test_prompt_from_file_and_stdin(tiny_trio, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("the cat", encoding="utf-8")
    base = ["--method", "single", "--large-ins", str(tiny_trio["large_ins"]), "-n", "5", "--n-ctx", "64", "--json"]
    a = json.loads(trimix("generate", *base, "--file", str(f)).stdout)
    b = json.loads(trimix("generate", *base, "-", stdin=b"the cat").stdout)
    c = json.loads(trimix("generate", *base, "the cat").stdout)
    assert a["token_ids"] == b["token_ids"] == c["token_ids"]


@pytest.mark.slow
def test_inspect(tiny_trio, smollm2):
    r = trimix("inspect", "--json", str(tiny_trio["large_ins"]), str(tiny_trio["small_cpt"]))
    out = json.loads(r.stdout)
    assert r.returncode == 0 and out["fusable"] is True
    m = out["models"][0]
    assert m["architecture"] == "llama" and m["vocab_type"].startswith("SentencePiece") and m["quantization"] == "F32"
    r = trimix("inspect", str(tiny_trio["large_ins"]), str(smollm2))
    assert r.returncode == 1 and "not fusable" in r.stdout.decode()
    r = trimix("inspect", "--json", str(smollm2))
    m = json.loads(r.stdout)["models"][0]
    assert m["vocab_size"] == 49152 and m["quantization"] == "Q4_1" and m["vocab_type"] == "byte-level BPE"
