"""trimix serve: a real uvicorn server in a subprocess, driven with the openai client and raw HTTP.

One server with the demo trio serves most tests of this module (``--parallel 2 --queue 2``, so the
queue limit is easy to reach); a second one with the tiny test models checks the API key and Ctrl-C.
Both listen on 127.0.0.1 on a free port (``--port 0``) and run llama.cpp on one thread, which keeps
a shared machine's other work from stalling its decode.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import threading
import time

import pytest

for _mod in ("starlette", "uvicorn", "pydantic", "jinja2", "httpx", "openai"):
    pytest.importorskip(_mod, reason="trimix serve's tests need the [serve] extra and httpx/openai ([test])")

import httpx  # noqa: E402
import openai  # noqa: E402
from commands import trimix  # noqa: E402
from serving import CHROMIUM_FLAGS, UG, ServerProcess, health, post, start_server, wait_idle  # noqa: E402

from trimix_cpp.server.schema import HAS_DRAFT  # noqa: E402

LONG = {"max_tokens": 1000, "stop": []}  # the demo trio repeats itself rather than end: a long stream


@pytest.fixture(scope="module")
def demo():
    server = start_server("--lang", "demo", "--parallel", "2", "--queue", "2", "--max-body", "65536")
    yield server
    rc = server.stop()
    assert rc == 0, server.log()
    assert "stopped; models freed" in server.log()
    assert "Traceback" not in server.log()


@pytest.fixture(scope="module")
def client(demo):
    return openai.OpenAI(base_url=demo.url + "/v1", api_key="not-needed", max_retries=0, timeout=300)


# -- the routes -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_health_models_and_page(demo, client):
    h = health(demo)
    assert h["status"] == "ok" and h["model"] == "trimix-demo" and h["sequences"] == 2
    models = client.models.list()
    assert [m.id for m in models.data] == ["trimix-demo"]
    assert models.data[0].trimix["models"]["large_ins"].startswith("SmolLM2")
    page = httpx.get(demo.url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert 'dir="auto"' in page.text and "http" not in page.text.replace("http-equiv", "")  # nothing external
    for asset in ("app.js", "style.css"):
        r = httpx.get(f"{demo.url}/static/{asset}", timeout=10)
        assert r.status_code == 200 and "http://" not in r.text and "https://" not in r.text


# -- generation -----------------------------------------------------------------------------------


def _stream_completion(client: openai.OpenAI, **kw) -> tuple[list[str], object, dict]:
    pieces, usage, extra = [], None, {}
    for chunk in client.completions.create(model="any", stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.text:
                pieces.append(choice.text)
            if choice.finish_reason is not None:
                extra = chunk.trimix
    return pieces, usage, extra


@pytest.mark.slow
@pytest.mark.parametrize("weights", [None, (0.3, 0.6)], ids=["ppl-selection", "fixed-weights"])
def test_streamed_completion_equals_trimix_generate(demo, client, weights):
    args = ["--alpha", str(weights[0]), "--beta", str(weights[1])] if weights else []
    r = trimix("generate", "--lang", "demo", "--threads", "1", "-n", "24", "--json", *args, UG)
    assert r.returncode == 0, r.stderr.decode()
    cli = json.loads(r.stdout)
    extra_body = {"trimix": {"alpha": weights[0], "beta": weights[1]}} if weights else None
    pieces, usage, info = _stream_completion(client, prompt=UG, max_tokens=24, extra_body=extra_body)
    assert len(pieces) >= 2
    assert "".join(pieces) == cli["text"]
    assert usage.completion_tokens == len(cli["token_ids"]) and usage.prompt_tokens == cli["timings"]["prompt_tokens"]
    assert info["weights"] == cli["weights"] and info["method"] == "trimix"
    if weights:
        assert "selection" not in info and "selection" not in cli
    else:
        assert info["selection"]["chosen"] == cli["selection"]["chosen"]
        assert info["selection"]["strategy"] == "ppl" and len(info["selection"]["grid"]) == 36
    whole = client.completions.create(model="any", prompt=UG, max_tokens=24, extra_body=extra_body)
    assert whole.choices[0].text == cli["text"] and whole.trimix["weights"] == cli["weights"]
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


@pytest.mark.slow
def test_chat_streamed_and_whole_agree(demo, client):
    messages = [{"role": "user", "content": UG}]
    whole = client.chat.completions.create(model="trimix-demo", messages=messages, max_tokens=16)
    text = whole.choices[0].message.content
    assert text and whole.choices[0].message.role == "assistant"
    assert whole.trimix["selection"]["strategy"] == "ppl" and whole.usage.completion_tokens > 0
    pieces, roles, last = [], [], None
    stream = client.chat.completions.create(model="x", messages=messages, max_tokens=16, stream=True)
    for chunk in stream:
        delta = chunk.choices[0].delta
        roles += [delta.role] if delta.role else []
        pieces += [delta.content] if delta.content else []
        last = chunk
    assert roles == ["assistant"] and "".join(pieces) == text
    assert last.choices[0].finish_reason == whole.choices[0].finish_reason
    assert last.trimix["weights"] == whole.trimix["weights"]


@pytest.mark.slow
def test_per_request_methods_and_sampling(demo, client):
    def run(**trimix):
        r = client.completions.create(model="m", prompt=UG, max_tokens=4, extra_body={"trimix": trimix})
        return r.trimix

    assert run(method="proxy")["weights"] == {"large_ins": 1.0, "small_cpt": 1.0, "small_base": -1.0}
    assert run(method="single", role="small_cpt")["weights"] == {"small_cpt": 1.0}
    assert run(method="contrastive", beta=0.5)["method"] == "contrastive"
    ent = run(select="ent", grid_alpha=[0.1, 0.5], grid_beta=[0.5, 1.0])
    assert ent["selection"]["strategy"] == "ent" and len(ent["selection"]["grid"]) == 4
    if HAS_DRAFT:  # speculative decoding, when the engine has it: the small models draft, the fused target checks
        drafted = run(alpha=0.3, beta=0.6, draft=3)
        assert drafted["weights"]["large_ins"] == 0.3 and drafted["timings"]["draft_tokens"] > 0
    hot = {"temperature": 1.2, "top_p": 0.9, "seed": 7}
    a, b = (client.completions.create(model="m", prompt=UG, max_tokens=12, **hot).choices[0].text for _ in "ab")
    assert a == b  # same seed, same text


# -- bad requests ---------------------------------------------------------------------------------

NAN = b'{"prompt": "x", "trimix": {"alpha": NaN, "beta": 0.5}}'
INF = b'{"prompt": "x", "trimix": {"alpha": 0.5, "beta": Infinity}}'
HUGE = b'{"prompt": "x", "trimix": {"alpha": 1e999, "beta": 0.5}}'
DEEP = b'{"prompt": ' + b"[" * 20000 + b"]" * 20000 + b"}"
C, CH = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]

BAD = [
    # (path, body, status, param, code)
    (C, b'{"prompt": "x",', 400, None, "invalid_json"),
    (C, b"[1, 2]", 400, None, "invalid_json"),
    (C, b"", 400, None, "invalid_json"),
    (C, b'{"prompt": "\xff\xfe"}', 400, None, "invalid_json"),
    (C, DEEP, 400, None, "invalid_json"),
    (C, {"prompt": "x", "foo": 1}, 400, "foo", "unknown_field"),
    (C, {"prompt": "x", "trimix": {"wat": 1}}, 400, "trimix.wat", "unknown_field"),
    (C, {"max_tokens": 3}, 400, "prompt", "missing_field"),
    (C, {"prompt": "x", "temperature": "hot"}, 400, "temperature", "invalid_type"),
    (C, {"prompt": "x", "max_tokens": 1.5}, 400, "max_tokens", "invalid_type"),
    (C, {"prompt": "x", "max_tokens": True}, 400, "max_tokens", "invalid_type"),
    (C, {"prompt": "x", "stop": 3}, 400, "stop", "invalid_type"),
    (C, {"prompt": "x", "stream": "yes"}, 400, "stream", "invalid_type"),
    (C, {"prompt": "x", "trimix": "ppl"}, 400, "trimix", "invalid_type"),
    (C, {"prompt": "x", "trimix": {"alpha": "abc", "beta": 0.5}}, 400, "trimix.alpha", "invalid_type"),
    (C, {"prompt": [1.5]}, 400, "prompt", "invalid_type"),
    (C, {"prompt": ["a", "b"]}, 400, "prompt", "unsupported"),
    (C, {"prompt": [99999999]}, 400, "prompt", "invalid_value"),
    (C, NAN, 400, "trimix.alpha", "invalid_value"),
    (C, INF, 400, "trimix.beta", "invalid_value"),
    (C, HUGE, 400, "trimix.alpha", "invalid_value"),
    (C, {"prompt": "x", "trimix": {"alpha": 5000, "beta": 0.5}}, 400, "trimix.alpha", "invalid_value"),
    (C, {"prompt": "x", "trimix": {"method": "best"}}, 400, "trimix.method", "invalid_value"),
    (C, {"prompt": "x", "trimix": {"method": "single", "role": "bogus"}}, 400, "trimix.role", "invalid_value"),
    (C, {"prompt": "x", "trimix": {"method": "proxy", "alpha": 0.5}}, 400, "trimix.method", "invalid_value"),
    (C, {"prompt": "x", "trimix": {"select": "ppl", "alpha": 0.5}}, 400, "trimix.select", "invalid_value"),
    (C, {"prompt": "x", "trimix": {"method": "trimix4"}}, 400, "trimix.alpha", "invalid_value"),
    (C, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    (C, {"prompt": "x", "max_tokens": -1}, 400, "max_tokens", "invalid_value"),
    (C, {"prompt": "x", "max_tokens": 10**9}, 400, "max_tokens", "invalid_value"),
    (C, {"prompt": "x", "top_p": 0.5}, 400, "top_p", "invalid_value"),
    (C, {"prompt": "x", "seed": 3}, 400, "seed", "invalid_value"),
    (C, {"prompt": "x", "temperature": -1}, 400, "temperature", "invalid_value"),
    (C, {"prompt": "x", "temperature": 1, "seed": 2**70}, 400, "seed", "invalid_value"),
    (C, {"prompt": "x", "n": 2}, 400, "n", "unsupported"),
    (C, {"prompt": "x", "logprobs": 99}, 400, "logprobs", "invalid_value"),
    (CH, {"messages": MSG, "top_logprobs": 2}, 400, "top_logprobs", "invalid_value"),
    (C, {"prompt": "x", "presence_penalty": 1e9}, 400, "presence_penalty", "invalid_value"),
    (C, {"prompt": "x", "repeat_penalty": 0}, 400, "repeat_penalty", "invalid_value"),
    (C, {"prompt": "x", "repeat_last_n": 8}, 400, "repeat_last_n", "invalid_value"),
    (C, {"prompt": "x", "frequency_penalty": "1"}, 400, "frequency_penalty", "invalid_type"),
    (C, {"prompt": UG * 400}, 400, "prompt", "context_length_exceeded"),
    (C, {"prompt": UG * 400, "stream": True}, 400, "prompt", "context_length_exceeded"),
    (C, {"prompt": "x" * 70000}, 413, None, "request_too_large"),
    (CH, {"messages": [{"role": "user", "content": UG * 400}]}, 400, "messages", "context_length_exceeded"),
    (CH, {"messages": "hi"}, 400, "messages", "invalid_type"),
    (CH, {"messages": [5]}, 400, "messages[0]", "invalid_type"),
    (CH, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "invalid_type"),
    (CH, {"messages": []}, 400, "messages", None),
    (CH, {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role", "unsupported"),
    (CH, {"messages": [*MSG, {"role": "assistant", "content": "x"}]}, 400, "messages", None),
    (
        CH,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages[0].content[0]",
        "unsupported",
    ),
    (CH, {"messages": MSG, "tools": [{"type": "function"}]}, 400, "tools", "unsupported"),
    (CH, {"messages": MSG, "max_tokens": 5, "max_completion_tokens": 5}, 400, "max_tokens", None),
    (CH, {"messages": MSG, "response_format": {"type": "json_object"}}, 400, "response_format.type", None),
    (C, {"prompt": "x", "trimix": {"draft": -1 if HAS_DRAFT else 2}}, 400, "trimix.draft", None),
]


@pytest.mark.parametrize("path,body,status,param,code", BAD)
def test_bad_requests_get_openai_errors(demo, path, body, status, param, code):
    r = post(demo, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param
    if code is not None:
        assert err["code"] == code
    assert err["message"] and "\n" not in err["message"] and "Traceback" not in err["message"]
    assert "--" not in err["message"].replace("--n-ctx", "")  # request fields, not command-line flags


@pytest.mark.parametrize(
    "body,message,param",
    [
        (
            {"prompt": "x", "temperature": 1, "top_k": -1},
            "top_k must be a whole number >= 0 (0 turns it off), got -1",
            "top_k",
        ),
        ({"prompt": "x", "seed": 3}, "seed applies to sampling, but decoding is greedy: set temperature > 0", "seed"),
        (
            {"prompt": "x", "trimix": {"method": "proxy", "alpha": 0.5}},
            "trimix.method proxy takes no trimix.alpha: Proxy Tuning weighs the large model by 1 and the small pair "
            "by trimix.beta",
            "trimix.method",
        ),
    ],
)
def test_library_errors_name_the_request_fields(demo, body, message, param):
    """The library raises with the parameter; the server names it by the field the request set."""
    err = post(demo, C, body).json()["error"]
    assert (err["message"], err["param"]) == (message, param)


def test_routes_and_methods_that_do_not_exist(demo):
    for method, path, status in (("GET", C, 405), ("GET", "/nope", 404), ("POST", "/v1/models", 405)):
        r = httpx.request(method, demo.url + path, timeout=10)
        assert r.status_code == status and r.json()["error"]["code"] in ("not_found", "method_not_allowed")


def test_the_server_survives_bad_requests_and_logs_each(demo, client):
    assert post(demo, C, NAN).status_code == 400
    r = client.completions.create(model="m", prompt=UG, max_tokens=2)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert health(demo)["status"] == "ok"
    time.sleep(0.5)  # the log line is written as the response ends
    assert any('"POST /v1/completions" 400' in line and "trimix.alpha" in line for line in demo.lines)
    ok = [line for line in demo.lines if '"POST /v1/completions" 200' in line]
    assert ok and all(re.search(r"\w+=\S+ .*prompt \d+ tok, generated \d+ tok", line) for line in ok)


# -- concurrency: the queue limit, disconnects -----------------------------------------------------


def _open_stream(server: ServerProcess, body: dict) -> tuple[httpx.Client, httpx.Response]:
    c = httpx.Client(timeout=120)
    resp = c.send(c.build_request("POST", server.url + C, json={**body, "stream": True}), stream=True)
    assert resp.status_code == 200, resp.read()
    return c, resp


@pytest.mark.slow
def test_queue_limit_disconnects_free_sequences(demo):
    wait_idle(demo)
    streams = [_open_stream(demo, {"prompt": UG, **LONG}) for _ in range(4)]  # 2 decoding, 2 waiting
    try:
        lines = streams[0][1].iter_lines()
        assert next(line for line in lines if line.startswith("data: ")).startswith("data: {")
        deadline = time.monotonic() + 30
        # the second request joins the batch at the next step; the last ones reach the scheduler's
        # queue when the worker next takes in new requests
        while ((h := health(demo))["active"], h["queued"]) != (2, 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert h["in_flight"] == 4 and h["active"] == 2 and h["queued"] == 2, h
        busy = post(demo, C, {"prompt": UG, "max_tokens": 2})
        assert busy.status_code == 503 and int(busy.headers["retry-after"]) >= 1
        assert busy.json()["error"]["code"] == "server_busy"
    finally:
        for c, resp in streams:  # hang up mid-stream
            resp.close()
            c.close()
    wait_idle(demo)  # every sequence and KV cell back, long before 1000 tokens could be written
    r = post(demo, C, {"prompt": UG, "max_tokens": 3}).json()
    assert r["usage"]["completion_tokens"] >= 1 and r["trimix"]["timings"]["queued_s"] < 1.0
    assert sum("client disconnected" in line for line in demo.lines) >= 4


@pytest.mark.slow
def test_a_waiting_non_streaming_client_that_leaves_is_cancelled(demo):
    wait_idle(demo)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(demo.url + C, json={"prompt": UG, **LONG}, timeout=httpx.Timeout(120, read=1.5))
    wait_idle(demo)


# -- the chat page in a real browser ---------------------------------------------------------------


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.slow
def test_chat_page_streams_in_a_headless_browser(demo, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs the playwright package")
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no chromium binary (apt-get install chromium) for the browser test")
    flags = CHROMIUM_FLAGS
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=flags)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            problems: list[str] = []
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.goto(demo.url + "/")
            # locators wait from Playwright's own isolated world: the page's CSP forbids eval in its own
            page.locator("#model", has_text="trimix-demo").wait_for(timeout=30_000)
            page.click("#settings-toggle")
            page.fill("#max_tokens", "24")
            page.fill("#input", UG)
            page.click("#send")
            reply = page.locator(".msg.assistant")
            page.locator(".msg.assistant .body").filter(has_text=re.compile(r"\S")).wait_for(timeout=120_000)
            page.locator(".msg.assistant[data-done='true']").wait_for(timeout=120_000)
            text = reply.locator(".body").inner_text()
            meta = reply.locator(".meta").inner_text()
            chunks = int(reply.get_attribute("data-chunks") or 0)
            rtl = page.evaluate("document.querySelector('.msg.assistant .body').matches(':dir(rtl)')")
            dirs = page.evaluate("[...document.querySelectorAll('.msg, .msg .body, #input')].map(e => e.dir)")
            shot = tmp_path / "chat.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert text.strip() and chunks >= 2, (text, chunks)  # it arrived in pieces
    assert "large_ins" in meta and "chosen by ppl" in meta and "error" not in meta, meta
    assert dirs and set(dirs) == {"auto"}
    assert rtl  # Uyghur text, laid out right to left by dir="auto"
    assert shot.stat().st_size > 10_000
    assert not problems, problems


# -- the API key, the command line, Ctrl-C ---------------------------------------------------------


@pytest.mark.slow
def test_api_key_and_ctrl_c(tiny_trio, tmp_path):
    key_file = tmp_path / "key.txt"
    key_file.write_text("s3cret-key\n", encoding="utf-8")
    roles = [f"--{r.replace('_', '-')}={tiny_trio[r]}" for r in ("large_ins", "small_cpt", "small_base")]
    server = start_server(*roles, "--n-ctx", "512", "--api-key-file", str(key_file))
    try:
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        assert httpx.get(server.url + "/", timeout=10).status_code == 200
        assert httpx.get(server.url + "/static/app.js", timeout=10).status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"}):
            r = httpx.get(server.url + "/v1/models", headers=headers, timeout=10)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["code"] == "invalid_api_key"
        assert post(server, C, {"prompt": "the cat", "max_tokens": 2}).status_code == 401
        ok = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret-key", max_retries=0, timeout=60)
        assert ok.models.list().data[0].id == "trimix"
        assert ok.completions.create(model="trimix", prompt="the cat", max_tokens=3).usage.completion_tokens >= 1
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            ok.chat.completions.create(model="trimix", messages=MSG, max_tokens=3)
        # Ctrl-C with a stream in flight: the stream ends, the server exits cleanly
        stream = ok.completions.create(model="t", prompt="the cat", max_tokens=400, stop=[], stream=True)
        first = next(iter(stream))
        assert first.choices
        server.proc.send_signal(signal.SIGINT)
        with pytest.raises(openai.APIError, match="shutting down"):
            for _ in stream:
                pass
        assert server.proc.wait(60) == 0
    finally:
        server.stop()
    assert "stopped; models freed" in server.log(), server.log()
    assert "Traceback" not in server.log()


@pytest.mark.slow
def test_cli_refuses_bad_setups(tiny_trio, tmp_path):
    missing = tmp_path / "missing.gguf"
    r = trimix("serve", "--host", "0.0.0.0", "--large-ins", str(missing))
    err = r.stderr.decode()
    assert r.returncode == 1 and "warning: listening on 0.0.0.0 without an API key" in err
    assert "model file not found" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    r = trimix("serve", "--large-ins", str(tiny_trio["large_ins"]), "--api-key-file", str(empty))
    assert r.returncode == 1 and "is empty" in r.stderr.decode()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = trimix("serve", "--large-ins", str(tiny_trio["large_ins"]), "--port", str(port))
    err = r.stderr.decode()
    assert r.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in err and len(err.strip().splitlines()) == 1


def test_serve_help():
    r = trimix("serve", "--help")
    out = r.stdout.decode()
    assert r.returncode == 0
    for flag in ("--host", "--port", "--api-key-file", "--parallel", "--queue", "--lang"):
        assert flag in out


def test_health_is_503_until_the_models_are_loaded(tiny_trio):
    from starlette.testclient import TestClient

    import trimix_cpp as tm
    from trimix_cpp.modelset import ModelSet
    from trimix_cpp.server import EngineWorker, ServerConfig, TrimixServer

    gate = threading.Event()
    paths = {r: tiny_trio[r] for r in ("large_ins", "small_cpt", "small_base")}

    def load() -> tm.Engine:
        gate.wait(60)
        return tm.Engine(paths, tm.LoadOptions(n_ctx=256, n_gpu_layers=0, n_threads=1))

    worker = EngineWorker(load, lambda engine: server.on_loaded(engine))
    server = TrimixServer(ModelSet(None, {}), worker, ServerConfig())
    worker.start()
    try:
        with TestClient(server.app, base_url="http://localhost") as http:
            assert http.get("/health").status_code == 503 and http.get("/health").json()["status"] == "loading"
            early = http.post(C, json={"prompt": "the cat", "max_tokens": 2})
            assert early.status_code == 503 and early.json()["error"]["code"] == "loading"
            assert early.headers["retry-after"]
            gate.set()
            assert worker.ready.wait(60) and worker.loaded
            assert http.get("/health").json()["status"] == "ok"
            assert http.post(C, json={"prompt": "the cat", "max_tokens": 2}).json()["usage"]["completion_tokens"] >= 1
    finally:
        gate.set()
        worker.stop()
