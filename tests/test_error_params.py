"""Errors carry their parameter as data: Python callers read the argument's name, the command line
its flag, the server the request field (and ``param``), all from one raise."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

import trimix_cpp as tm
from trimix_cpp import _llama, bench, loading
from trimix_cpp.errors import TrimixError, WeightError, flag
from trimix_cpp.methods import MethodChoice, resolve_fusion, sampling_params
from trimix_cpp.sampling import SamplingParams
from trimix_cpp.server.errors import from_trimix, request_name


def trimix_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trimix_cli.main", *args], capture_output=True, timeout=300)


# -- the error type ---------------------------------------------------------------------------------


def test_a_template_renders_each_parameter_by_the_naming_given():
    e = TrimixError(
        "{max_tokens} must be a whole number >= 0, got {got!r} (or raise {n_ctx})", param="max_tokens", got=-1
    )
    assert str(e) == "max_tokens must be a whole number >= 0, got -1 (or raise n_ctx)"
    assert e.render(flag) == "--max-tokens must be a whole number >= 0, got -1 (or raise --n-ctx)"
    assert e.render({"max_tokens": "MAX"}) == "MAX must be a whole number >= 0, got -1 (or raise n_ctx)"
    assert e.render(request_name) == "max_tokens must be a whole number >= 0, got -1 (or raise --n-ctx)"
    assert e.param == "max_tokens" and e.values == {"got": -1}


def test_braces_in_values_and_in_plain_messages_stay_as_they_are():
    e = TrimixError("{path} exists (pass {force} to replace it)", param="force", path="/tmp/a{b}/{c")
    assert str(e) == "/tmp/a{b}/{c exists (pass force to replace it)"
    assert e.render(flag) == "/tmp/a{b}/{c exists (pass --force to replace it)"
    assert TrimixError("{{literal}} braces and {field}", param="x", field="v").render(flag) == "{literal} braces and v"
    plain = TrimixError("a plain message {with} {braces and\n  two lines")
    assert str(plain) == plain.render(flag) == "a plain message {with} {braces and two lines"
    assert plain.param is None


def test_a_wrapped_error_keeps_its_names_and_a_subclass_its_type():
    inner = WeightError("{param} must be a number, got {got!r}", param="alpha", got="x")
    outer = TrimixError("task t: {error}", param=inner.param, error=inner)
    assert str(outer) == "task t: alpha must be a number, got 'x'"
    assert outer.render(flag) == "task t: --alpha must be a number, got 'x'"
    back = pickle.loads(pickle.dumps(inner))  # cluster workers send errors between processes
    assert type(back) is WeightError and back.param == "alpha" and back.render(flag) == inner.render(flag)


def test_values_are_formatted_once_so_a_multi_line_value_still_gives_one_line():
    e = TrimixError("cannot read {path}: {why}", param="out", path="p", why="first\nsecond")
    assert e.render(flag) == "cannot read p: first second"


# -- raise sites: the Python name, the flag, the request field ---------------------------------------


@pytest.mark.parametrize(
    "call,python,cli,server,param",
    [
        (
            lambda: SamplingParams(top_k=-1).validate(),
            "top_k must be a whole number >= 0 (0 turns it off), got -1",
            "--top-k must be a whole number >= 0 (0 turns it off), got -1",
            "top_k must be a whole number >= 0 (0 turns it off), got -1",
            "top_k",
        ),
        (
            lambda: sampling_params(seed=3),
            "seed applies to sampling, but decoding is greedy: set temperature > 0",
            "--seed applies to sampling, but decoding is greedy: set --temperature > 0",
            "seed applies to sampling, but decoding is greedy: set temperature > 0",
            "seed",
        ),
        (
            lambda: resolve_fusion(MethodChoice(method="proxy", alpha=0.5)),
            "method proxy takes no alpha: Proxy Tuning weighs the large model by 1 and the small pair by beta",
            "--method proxy takes no --alpha: Proxy Tuning weighs the large model by 1 and the small pair by --beta",
            "trimix.method proxy takes no trimix.alpha: Proxy Tuning weighs the large model by 1 and the small pair "
            "by trimix.beta",
            "trimix.method",
        ),
        (
            lambda: resolve_fusion(MethodChoice(select="ent", grid_alpha="0.1,x")),
            "grid_alpha: a grid is a comma-separated list of numbers, got '0.1,x'",
            "--grid-alpha: a grid is a comma-separated list of numbers, got '0.1,x'",
            "trimix.grid_alpha: a grid is a comma-separated list of numbers, got '0.1,x'",
            "trimix.grid_alpha",
        ),
        (
            lambda: loading.check_parallel(0),
            "n_seq must be a whole number from 1 to 255 (llama.cpp holds 256 sequences and trimix keeps one for "
            "scoring), got 0",
            "--parallel must be a whole number from 1 to 255 (llama.cpp holds 256 sequences and trimix keeps one "
            "for scoring), got 0",
            None,  # a server's own flag, not a request field
            None,
        ),
        (
            lambda: _llama.check_load_numbers(n_ctx=1, n_batch=8, n_threads=None),
            None,
            "--n-ctx must be a whole number from 2 (a prompt token and a generated one) to 16777216, got 1",
            "--n-ctx must be a whole number from 2 (a prompt token and a generated one) to 16777216, got 1",
            None,
        ),
        (
            lambda: bench.run_bench({}, tm.LoadOptions(), budget_s=0),
            "budget_s must be a positive number of seconds, got 0",
            "--time must be a positive number of seconds, got 0",
            None,
            None,
        ),
    ],
)
def test_one_raise_names_the_parameter_for_each_caller(call, python, cli, server, param):
    with pytest.raises(TrimixError) as info:
        call()
    e = info.value
    if python is not None:
        assert str(e) == python
    assert e.render(flag) == cli
    body = from_trimix(e).body()["error"]
    if server is not None:
        assert body["message"] == server
    assert body["param"] == param


def test_the_python_name_is_the_argument_the_caller_gave():
    with pytest.raises(TrimixError, match=r"^n_threads must be from 0") as info:
        tm.LoadOptions(n_threads=-1)
    assert info.value.param == "n_threads" and info.value.render(flag).startswith("--threads must be from 0")
    with pytest.raises(TrimixError, match=r"^temperature must be a finite number"):
        sampling_params(temperature=float("nan"))


def test_the_command_line_prints_the_flag(tiny_trio):
    models = [f"--{r.replace('_', '-')}={tiny_trio[r]}" for r in ("large_ins", "small_cpt", "small_base")]
    cases = [
        (
            ["generate", *models, "--alpha", "0.2", "--beta", "0.3", "--top-p", "0.5", "x"],
            "error: --top-p applies to sampling, but decoding is greedy: set --temperature > 0",
        ),
        (
            ["generate", *models, "--method", "proxy", "--alpha", "0.5", "x"],
            "error: --method proxy takes no --alpha: Proxy Tuning weighs the large model by 1 and the small pair by "
            "--beta",
        ),
        (
            ["bench", *models, "--time", "0"],  # run_bench's budget_s
            "error: --time must be a positive number of seconds, got 0.0",
        ),
    ]
    for args, line in cases:
        r = trimix_cli(*args)
        err = r.stderr.decode()
        assert r.returncode == 1 and err.strip().splitlines()[-1] == line, err
