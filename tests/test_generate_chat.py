"""``generate --chat`` builds the prompt the server's chat route builds, and both apply the same
penalties and report the same log-probabilities of the fused distribution."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("httpx")

from commands import trimix
from serving import UG, post, start_server

pytestmark = pytest.mark.slow  # every test here takes over a second (see README, Tests)


@pytest.fixture(scope="module")
def demo():
    server = start_server("--lang", "demo")
    yield server
    assert server.stop() == 0, server.log()


SETTINGS = {"max_tokens": 8, "repeat_penalty": 1.3, "frequency_penalty": 0.2}


def test_generate_chat_and_the_chat_route_send_the_same_prompt(demo):
    body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": UG}]}
    r = post(demo, "/v1/chat/completions", {**body, **SETTINGS, "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    served = r.json()
    cli = trimix(
        "generate", "--lang", "demo", "--chat", "--system", "Be brief.", "-n", "8", "--repeat-penalty", "1.3",
        "--frequency-penalty", "0.2", "--json", "--logprobs", "2", UG,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr.decode()
    out = json.loads(cli.stdout)
    assert out["timings"]["prompt_tokens"] == served["usage"]["prompt_tokens"]
    assert out["text"] == served["choices"][0]["message"]["content"]
    assert out["weights"] == pytest.approx(served["trimix"]["weights"])
    content = served["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == [e["token"] for e in out["logprobs"]]
    assert [e["logprob"] for e in content] == pytest.approx([e["logprob"] for e in out["logprobs"]], abs=1e-5)
    assert all(len(e["top_logprobs"]) == 2 for e in content)
    # without --chat the same words are a different prompt (no template)
    plain = json.loads(trimix("generate", "--lang", "demo", "-n", "1", "--json", UG).stdout)
    assert plain["timings"]["prompt_tokens"] < out["timings"]["prompt_tokens"]


def test_completions_logprobs_and_a_streamed_chat(demo):
    r = post(demo, "/v1/completions", {"prompt": UG, "max_tokens": 5, "logprobs": 3, "presence_penalty": 0.5})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    n = r.json()["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert all(v <= 0 for v in lp["token_logprobs"]) and all(len(t) <= 3 for t in lp["top_logprobs"])
    body = {"messages": [{"role": "user", "content": UG}], "max_tokens": 5, "logprobs": True, "stream": True}
    r = post(demo, "/v1/chat/completions", body)
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    closing = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(closing[-1]["choices"][0]["logprobs"]["content"]) == closing[-1]["trimix"]["timings"]["gen_tokens"]


def test_generate_chat_refusals():
    r = trimix("generate", "--lang", "demo", "--chat", "--raw", "x")
    assert r.returncode == 1 and "choose one" in r.stderr.decode()
    r = trimix("generate", "--lang", "demo", "--system", "s", "x")
    assert r.returncode == 1 and "add --chat" in r.stderr.decode()
    r = trimix("generate", "--lang", "demo", "--logprobs", "2", "x")
    assert r.returncode == 1 and "add --json" in r.stderr.decode()
