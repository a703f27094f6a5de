"""The command line's conventions: --version, switches shown without a type, usage errors as one line,
inspect --lang, and optional profile roles that never fail a check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import trimix_cpp as tm

pytestmark = pytest.mark.slow  # every test here takes over a second (see README, Tests)

BOX = set("╭╮╰╯│─")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trimix_cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_version():
    for flag in ("--version", "-V"):
        r = run(flag)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"trimix {tm.__version__} (llama-cpp-python ") and r.stdout.count("\n") == 1


def test_switches_show_no_type_in_help():
    for cmd in (["generate"], ["select"], ["models", "check"], ["eval"], ["serve"], []):
        r = run(*cmd, "--help", env={"COLUMNS": "200"})
        assert r.returncode == 0, r.stderr
        assert "<bool>" not in r.stdout, cmd
        assert "--help" in r.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["generate", "--bogus"], "No such option: --bogus"),
        (["generate", "--max-tokens", "x", "hi"], "Invalid value for '--max-tokens'"),
        (["generate", "-n"], "requires an argument"),
        (["models", "check"], "Missing option '--lang'"),
        (["inspect", "--lang"], "requires an argument"),
        (["nosuchcommand"], "No such command 'nosuchcommand'"),
        (["models", "nosuch"], "No such command 'nosuch'"),
        (["generate", "--json", "true"], "--json is a switch and takes no value"),
        (["eval", "t.jsonl", "--verbose", "false"], "--verbose is a switch and takes no value"),
        (["generate", "--no-utf8-guard", "0", "x"], "--no-utf8-guard is a switch"),
    ],
)
def test_usage_errors_are_one_line(args, needle):
    r = run(*args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert needle in lines[0] and "--help" in lines[0]
    assert not BOX & set(r.stderr) and "Usage:" not in r.stderr and not r.stdout


def test_the_usage_stays_on_help():
    r = run("generate", "--help")
    assert r.returncode == 0 and "Usage: trimix generate" in r.stdout and "--max-tokens" in r.stdout
    bare = run()
    assert "Usage: trimix" in bare.stdout and "generate" in bare.stdout


def test_a_text_after_a_switch_still_runs_when_placed_first(tiny_trio):
    """'--json true' is refused, but the prompt 'true' goes before the options or after --."""
    paths = [f"--{r.replace('_', '-')}={tiny_trio[r]}" for r in ("large_ins", "small_cpt", "small_base")]
    common = [*paths, "--alpha", "0.1", "--beta", "0.9", "-n", "2", "--n-ctx", "64"]
    for args in (["generate", "true", "--json", *common], ["generate", "--json", *common, "--", "true"]):
        r = run(*args)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["timings"]["prompt_tokens"] >= 1


def test_inspect_lang():
    r = run("inspect", "--lang", "demo", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["fusable"] and len(out["models"]) == 3
    assert {Path(m["path"]).name for m in out["models"]} >= {"small-cpt.gguf", "small-base.gguf"}
    none = run("inspect")
    assert none.returncode == 1 and none.stderr.startswith("error: give one or more GGUF files, or --lang")


def _row(listing: str, lang: str) -> str:
    """The table row of ``lang`` in ``trimix models list``."""
    return next(line for line in listing.splitlines() if line.count("│") > 2 and line.split("│")[1].strip() == lang)


def _profile(folder: Path, trio: dict[str, Path], method: str = "trimix", large_base: str = "absent.gguf") -> None:
    models = "\n".join(f'{r} = "{trio[r]}"' for r in ("large_ins", "small_cpt", "small_base"))
    (folder / "opt.toml").write_text(
        f'[profile]\nlang = "opt"\nmethod = "{method}"\nn_ctx = 64\n[models]\n{models}\nlarge_base = "{large_base}"\n',
        encoding="utf-8",
    )


def test_an_absent_optional_model_is_shown_as_optional_and_never_fails_a_check(tiny_trio, tmp_path):
    _profile(tmp_path, tiny_trio)
    env = {"TRIMIX_PROFILES": str(tmp_path), "COLUMNS": "250"}
    listing = run("models", "list", env=env)
    assert listing.returncode == 0, listing.stderr
    row = _row(listing.stdout, "opt")
    assert "○ large-base (optional: trimix4)" in row and "✗" not in row
    check = run("models", "check", "--lang", "opt", "--json", env=env)
    assert check.returncode == 0, check.stderr
    out = json.loads(check.stdout)
    assert out["fusable"] and [m["role"] for m in out["models"]] == ["large_ins", "small_cpt", "small_base"]
    assert out["optional_absent"] == [{"role": "large_base", "enables": ["trimix4"]}]
    table = run("models", "check", "--lang", "opt", env=env)
    assert table.returncode == 0 and "everything but --method trimix4 runs without it" in " ".join(table.stdout.split())
    # the other methods run; trimix4 says which model it needs
    ok = run("generate", "--lang", "opt", "--alpha", "0.1", "--beta", "0.9", "-n", "2", "the", env=env)
    assert ok.returncode == 0, ok.stderr
    four = run(
        "generate",
        "--lang",
        "opt",
        "--method",
        "trimix4",
        "--alpha",
        "0.1",
        "--beta",
        "0.9",
        "--gamma",
        "0.1",
        "x",
        env=env,
    )
    assert four.returncode == 1 and "large_base file for --lang opt not found" in four.stderr


def test_a_present_optional_model_is_checked(tiny_trio, tmp_path):
    _profile(tmp_path, tiny_trio, large_base=str(tiny_trio["large_base"]))
    check = run("models", "check", "--lang", "opt", "--json", env={"TRIMIX_PROFILES": str(tmp_path)})
    assert check.returncode == 0, check.stderr
    out = json.loads(check.stdout)
    assert len(out["models"]) == 4 and out["optional_absent"] == []


def test_a_model_the_profiles_method_needs_still_fails_when_absent(tiny_trio, tmp_path):
    """With method = trimix4 the large base is not optional."""
    _profile(tmp_path, tiny_trio, method="trimix4")
    env = {"TRIMIX_PROFILES": str(tmp_path), "COLUMNS": "250"}
    check = run("models", "check", "--lang", "opt", env=env)
    assert check.returncode == 1 and "large_base file for --lang opt not found" in check.stderr
    row = _row(run("models", "list", env=env).stdout, "opt")
    assert "✗ large-base" in row
