"""trimix serve under hostile or careless requests: nothing one request sends may stop the server, and
the page on a user's machine is no door for other web sites.

Every test here drives a real ``trimix serve`` (the tiny test models, one thread) over real HTTP,
mostly raw sockets, since the point is what arrives on the wire: report values past the largest
float, lone surrogates, clients that hang up mid-upload or never finish their headers, foreign Host
headers, text/plain bodies, and a few hundred generated requests. The command-line reports
(``select --json``, ``ppl --json``, ``calibrate``) get the same extreme weights.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import pytest

for _mod in ("starlette", "uvicorn", "pydantic", "httpx"):
    pytest.importorskip(_mod, reason="trimix serve's tests need the [serve] extra and httpx ([test])")

import httpx  # noqa: E402
from commands import trimix  # noqa: E402
from serving import ServerProcess, post, start_server  # noqa: E402

from trimix_cpp.methods import sampling_params  # noqa: E402

C, CH = "/v1/completions", "/v1/chat/completions"
EXTREME = {"grid_alpha": [1000], "grid_beta": [-1000]}  # inside the bounds; prompt NLL in the thousands


def _roles(trio) -> list[str]:
    return [f"--{r.replace('_', '-')}={trio[r]}" for r in ("large_ins", "small_cpt", "small_base")]


@pytest.fixture(scope="module")
def tiny(tiny_trio):
    server = start_server(*_roles(tiny_trio), "--n-ctx", "256", "-n", "4", "--allowed-host", "MyBox.lan")
    yield server
    rc = server.stop()
    assert rc == 0, server.log()
    assert "Traceback" not in server.log(), server.log()


def _strict_json(text: str):
    """JSON as a strict parser reads it: ``Infinity`` and ``NaN`` are not JSON."""

    def refuse(name: str):
        raise AssertionError(f"{name} in JSON output: {text[:300]}")

    return json.loads(text, parse_constant=refuse)


def _alive(server: ServerProcess) -> None:
    assert server.proc.poll() is None, f"the server exited:\n{server.log()}"
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"


# -- 2. no report value overflows, no reply stops the engine ---------------------------------------


@pytest.mark.slow
def test_extreme_grid_weights_get_a_reply_and_the_server_goes_on(tiny):
    r = post(tiny, C, {"prompt": "the cat sat on the mat", "max_tokens": 3, "trimix": EXTREME})
    assert r.status_code == 200, r.text
    body = _strict_json(r.text)
    cell = body["trimix"]["selection"]["grid"][0]
    assert cell["nll"] > 709.79 and cell["ppl"] is None  # exp(nll) is past the largest float: null
    assert body["usage"]["completion_tokens"] >= 1
    # streamed: the last chunk carries the same selection
    with httpx.stream(
        "POST", tiny.url + C, json={"prompt": "the cat", "max_tokens": 3, "stream": True, "trimix": EXTREME}, timeout=60
    ) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = _strict_json(next(e for e in reversed(events) if '"selection"' in e))
    assert last["trimix"]["selection"]["grid"][0]["ppl"] is None
    _alive(tiny)


def test_a_reply_that_cannot_be_built_fails_its_request_alone(tiny_trio, monkeypatch):
    """Whatever goes wrong while one job's reply is built (here a fault injected into it) ends that
    job with a 500; the engine thread, and the request decoding beside it, go on."""
    from starlette.testclient import TestClient

    import trimix_cpp as tm
    from trimix_cpp.modelset import ModelSet
    from trimix_cpp.server import EngineWorker, ServerConfig, TrimixServer, worker

    real = worker.outcome

    def outcome(gen):
        if gen.spec.max_tokens == 3:
            raise OverflowError("math range error")
        return real(gen)

    monkeypatch.setattr(worker, "outcome", outcome)
    paths = {r: tiny_trio[r] for r in ("large_ins", "small_cpt", "small_base")}
    w = EngineWorker(lambda: tm.Engine(paths, tm.LoadOptions(n_ctx=256, n_gpu_layers=0, n_threads=1, n_seq=2)))
    server = TrimixServer(ModelSet(None, {}), w, ServerConfig())
    w.start()
    try:
        assert w.ready.wait(60) and w.loaded
        with TestClient(server.app, base_url="http://localhost") as http:
            out: dict[int, httpx.Response] = {}

            def ask(n: int) -> None:
                out[n] = http.post(C, json={"prompt": "the cat", "max_tokens": n, "stop": []})

            threads = [threading.Thread(target=ask, args=(n,), daemon=True) for n in (3, 12)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert out[3].status_code == 500 and out[3].json()["error"]["code"] == "internal_error"
            assert out[12].status_code == 200 and out[12].json()["usage"]["completion_tokens"] == 12
            assert http.get("/health").json()["status"] == "ok"
            again = http.post(C, json={"prompt": "the cat", "max_tokens": 2})
            assert again.status_code == 200
    finally:
        w.stop()


@pytest.mark.slow
def test_cli_reports_write_null_for_perplexities_past_the_largest_float(tiny_trio, tmp_path):
    roles = _roles(tiny_trio)
    grid = ["--grid-alpha", "1000", "--grid-beta=-1000"]
    r = trimix("select", *roles, "--json", *grid, "the cat sat on the mat")
    assert r.returncode == 0, r.stderr.decode()
    sel = _strict_json(r.stdout.decode())
    assert sel["grid"][0]["ppl"] is None and sel["grid"][0]["nll"] > 709.79
    r = trimix("select", *roles, *grid, "the cat sat on the mat")  # the human table
    assert r.returncode == 0 and "inf" in r.stdout.decode(), r.stderr.decode()
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat. the dog ran after the cat.\n", encoding="utf-8")
    r = trimix("ppl", str(text), *roles, "--methods", "large-ins,trimix-grid", "--json", *grid)
    assert r.returncode == 0, r.stderr.decode()
    rows = {m["method"]: m for m in _strict_json(r.stdout.decode())["methods"]}
    assert rows["trimix-ppl@1000:-1000"]["ppl"] is None and math.isfinite(rows["large-ins"]["ppl"])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("the cat sat", "a dog ran far")))
    out = tmp_path / "weights.json"
    r = trimix("calibrate", "--prompts", str(prompts), *roles, "-o", str(out), "--n", "2", *grid)
    assert r.returncode == 0, r.stderr.decode()
    cal = _strict_json(out.read_text(encoding="utf-8"))
    assert cal["chosen"] == {"alpha": 1000.0, "beta": -1000.0} and cal["grid"][0]["ppl"] is None


# -- 2. strings that are not text, clients that leave or never finish --------------------------------


SURROGATE_BODIES = [
    # (path, raw JSON body, the field the 400 must name)
    (C, b'{"prompt": "ab\\ud800cd"}', "prompt"),
    (C, b'{"prompt": ["\\udfff"]}', "prompt[0]"),
    (C, b'{"prompt": "x", "stop": ["ok", "\\ud83d"]}', "stop[1]"),
    (C, b'{"prompt": "x", "trimix": {"method": "\\ud800"}}', "trimix.method"),
    (C, b'{"prompt": "x", "user": "\\udc00"}', "user"),
    (C, b'{"prompt": "x", "\\ud800": 1}', "\\ud800"),
    (CH, b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages[0].content"),
    (CH, b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}', None),
]


@pytest.mark.parametrize("path,body,param", SURROGATE_BODIES)
def test_lone_surrogates_are_a_400_naming_the_field(tiny, path, body, param):
    r = post(tiny, path, body)
    assert r.status_code == 400 and r.headers["content-type"] == "application/json", r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_unicode" and "surrogate" in err["message"]
    if param is not None:
        assert err["param"] == param
    else:
        assert err["param"] == "messages[0].content[0].text"


def _host_port(server: ServerProcess) -> tuple[str, int]:
    u = urlsplit(server.url)
    return u.hostname or "127.0.0.1", u.port or 80


def test_a_client_that_leaves_mid_upload_is_a_logged_disconnect(tiny):
    host, port = _host_port(tiny)
    with socket.create_connection((host, port), timeout=10) as s:
        head = f"POST {C} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        s.sendall(head.encode() + b'Content-Length: 5000\r\n\r\n{"prompt": "the cat')
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while not any(f'"POST {C}" 499' in line for line in tiny.lines) and time.monotonic() < deadline:
        time.sleep(0.1)
    line = next(line for line in tiny.lines if f'"POST {C}" 499' in line)
    assert "client disconnected" in line
    assert "Traceback" not in tiny.log() and "failed" not in tiny.log()
    _alive(tiny)


@pytest.mark.slow
def test_idle_and_half_open_connections_are_closed(tiny):
    """A connection that sends nothing, or half a request head, is closed by the server (within the
    header timeout) instead of holding a socket for ever."""
    host, port = _host_port(tiny)
    silent = socket.create_connection((host, port), timeout=30)
    half = socket.create_connection((host, port), timeout=30)
    half.sendall(f"POST {C} HTTP/1.1\r\nHost: {host}\r\n".encode())
    t0 = time.monotonic()
    try:
        for s in (silent, half):
            try:
                assert s.recv(1024) == b""  # the server closed it
            except ConnectionResetError:
                pass
        assert time.monotonic() - t0 < 25
    finally:
        silent.close()
        half.close()
    _alive(tiny)


@pytest.mark.slow
def test_a_body_that_stops_arriving_gets_a_408_and_the_connection_closes(monkeypatch):
    """The body deadline, shortened for the test, on the server's own uvicorn setup (no models are
    needed: the body is read before anything asks for them)."""
    import uvicorn

    from trimix_cpp.modelset import ModelSet
    from trimix_cpp.server import EngineWorker, ServerConfig, TrimixServer, lifecycle

    monkeypatch.setattr(lifecycle, "HEADER_TIMEOUT_S", 1.0)
    worker = EngineWorker(lambda: None)  # never started: the models never load
    app = TrimixServer(ModelSet(None, {}), worker, ServerConfig(body_timeout=1.0))
    sock = lifecycle.bind(lifecycle.Listen("127.0.0.1", 0))
    port = sock.getsockname()[1]
    cfg = uvicorn.Config(app.app, http=lifecycle._H11WithHeaderTimeout, lifespan="off", log_config=None)
    server = uvicorn.Server(cfg)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            head = f"POST {C} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            s.sendall(head.encode() + b'Content-Length: 100\r\n\r\n{"prompt"')
            t0 = time.monotonic()
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            waited = time.monotonic() - t0
        assert data.startswith(b"HTTP/1.1 408"), data
        assert json.loads(data.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
        assert 0.9 < waited < 10
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:  # the head deadline, shortened
            s.sendall(b"GET /health HTTP/1.1\r\n")
            t0 = time.monotonic()
            assert s.recv(1024) == b"" and time.monotonic() - t0 < 10
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


# -- 3. other web sites: Content-Type and Host ------------------------------------------------------


def test_post_bodies_must_be_declared_json(tiny):
    body = json.dumps({"prompt": "the cat", "max_tokens": 2}).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": ctype} if ctype else {}
        r = httpx.post(tiny.url + C, content=body, headers=headers, timeout=60)
        assert r.status_code == 415, (ctype, r.text)
        err = r.json()["error"]
        assert err["code"] == "unsupported_media_type" and "application/json" in err["message"]
    ok = httpx.post(tiny.url + C, content=body, headers={"Content-Type": "Application/JSON; charset=utf-8"}, timeout=60)
    assert ok.status_code == 200, ok.text


def _raw_get(server: ServerProcess, path: str, host_header: str) -> tuple[int, bytes]:
    host, port = _host_port(server)
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


def test_only_allowed_host_names_are_answered(tiny):
    _, port = _host_port(tiny)
    for host in ("evil.example", f"evil.example:{port}", "localhost.evil.example", "127.0.0.1.nip.io", "x"):
        for path in ("/", "/health", "/v1/models"):
            status, body = _raw_get(tiny, path, host)
            assert status == 403, (host, path)
            assert json.loads(body)["error"]["code"] == "host_not_allowed"
    r = httpx.post(tiny.url + C, json={"prompt": "x", "max_tokens": 1}, headers={"Host": "rebound.example"}, timeout=30)
    assert r.status_code == 403
    for host in (f"localhost:{port}", "LOCALHOST", f"127.0.0.1:{port}", f"[::1]:{port}", "mybox.lan", "MyBox.Lan.:80"):
        status, _ = _raw_get(tiny, "/health", host)
        assert status == 200, host
    for host in ("192.168.1.20:8080", "[fe80::1]"):  # an address cannot be rebound
        assert _raw_get(tiny, "/health", host)[0] == 200
    assert any('"GET /v1/models" 403' in line and "host_not_allowed" in line for line in tiny.lines)


# -- 3. the API key kept out of ps ------------------------------------------------------------------


@pytest.mark.slow
def test_api_key_from_the_environment(tiny_trio):
    os.environ["TRIMIX_API_KEY"] = "env-s3cret"
    try:
        server = start_server(*_roles(tiny_trio), "--n-ctx", "256")
    finally:
        del os.environ["TRIMIX_API_KEY"]
    try:
        assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
        ok = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer env-s3cret"}, timeout=10)
        assert ok.status_code == 200
        assert "API key required" in server.log()
    finally:
        assert server.stop() == 0


@pytest.mark.slow
def test_api_key_on_the_command_line_is_warned_and_an_empty_variable_refused(tmp_path):
    missing = str(tmp_path / "missing.gguf")
    r = trimix("serve", "--api-key", "k123", "--large-ins", missing)
    err = r.stderr.decode()
    assert "--api-key is visible" in err and "TRIMIX_API_KEY" in err and "model file not found" in err
    env = dict(os.environ, TRIMIX_API_KEY="  ")
    r = subprocess.run(
        [sys.executable, "-m", "trimix_cli.main", "serve", "--large-ins", missing],
        capture_output=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 1 and "TRIMIX_API_KEY is set but empty" in r.stderr.decode()
    r = trimix("serve", "--allowed-host", "a b", "--large-ins", missing)
    assert r.returncode == 1 and "is not a host name" in r.stderr.decode()


# -- 4. errors name the field; neutral sampling values pass with greedy decoding ----------------------


@pytest.mark.parametrize(
    "trimix_field,param",
    [
        ({"grid_alpha": [5000]}, "trimix.grid_alpha"),
        ({"grid_beta": []}, "trimix.grid_beta"),
        ({"select": "ent", "grid_alpha": "0.1,x"}, "trimix.grid_alpha"),
    ],
)
def test_grid_errors_name_the_grid_field(tiny, trimix_field, param):
    r = post(tiny, C, {"prompt": "x", "trimix": trimix_field})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"] and "--" not in err["message"]


@pytest.mark.slow
def test_sampling_values_that_ask_for_nothing_pass_with_greedy_decoding(tiny, tiny_trio, tmp_path):
    assert sampling_params(top_p=1.0, top_k=0, min_p=0.0).greedy
    for kw in ({"top_p": 0.9}, {"top_k": 5}, {"min_p": 0.1}, {"seed": 1}):
        with pytest.raises(Exception, match="greedy"):
            sampling_params(**kw)
    neutral = {"top_p": 1, "top_k": 0, "min_p": 0}
    r = post(tiny, C, {"prompt": "the cat", "max_tokens": 2, **neutral})
    assert r.status_code == 200, r.text
    assert post(tiny, C, {"prompt": "the cat", "max_tokens": 2, "top_p": 0.9}).status_code == 400
    roles = _roles(tiny_trio)
    r = trimix("generate", *roles, "-n", "2", "--top-p", "1", "--top-k", "0", "--min-p", "0", "the cat")
    assert r.returncode == 0, r.stderr.decode()
    batch = tmp_path / "b.jsonl"
    batch.write_text(json.dumps({"prompt": "the cat", "max_tokens": 2, **neutral}) + "\n", encoding="utf-8")
    r = trimix("generate", *roles, "--batch", str(batch))
    assert r.returncode == 0, r.stderr.decode()
    assert "error" not in json.loads(r.stdout.decode().splitlines()[0])


# -- the rule: no generated request stops the server or leaves a traceback ----------------------------


@pytest.mark.slow
def test_fuzzed_requests_never_stop_the_server(tiny):
    """A few hundred generated requests (fixed seed, bounded count): after each, /health answers
    and the log holds no traceback. Most fields get plausible values, one in twenty anything at all,
    so many requests reach the engine and the rest probe every check on the way."""
    pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    # any characters, lone surrogates included, and a few strings that matter more often than chance gives them
    text = st.text(st.characters(codec=None, exclude_categories=()), max_size=12) | st.sampled_from(
        ["", "the cat sat on the mat", "ئالاقەداشنى", "\ud800", "ok\udfff", "<|im_end|>", "{{ 7*7 }}"]
    )
    number = st.one_of(
        st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, 1, -1, 1000])
    )
    scalar = st.one_of(st.none(), st.booleans(), number, text)
    anything = st.recursive(
        scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3)
    )

    def mostly(valid):
        return st.integers(0, 19).flatmap(lambda k: anything if k == 0 else valid)

    weight = mostly(st.floats(-2000, 2000) | st.sampled_from([1000.0, -1000.0, 0.0, 0.5]))
    trimix_obj = st.sampled_from([EXTREME, {"select": "ent", **EXTREME}, {"alpha": 1000.0, "beta": -1000.0}]) | (
        st.fixed_dictionaries(
            {},
            optional={
                "method": mostly(st.sampled_from(["trimix", "proxy", "contrastive", "single", "trimix4", "best"])),
                "alpha": weight,
                "beta": weight,
                "gamma": weight,
                "role": mostly(st.sampled_from(["large_ins", "small_cpt", "small_base", "x"])),
                "select": mostly(st.sampled_from(["fixed", "ppl", "ent", "nope"])),
                "grid_alpha": mostly(st.lists(weight, max_size=3)),
                "grid_beta": mostly(st.lists(weight, max_size=3)),
                "utf8_guard": mostly(st.booleans()),
            },
        )
    )
    common = {
        "max_tokens": mostly(st.integers(-2, 6)),
        "temperature": mostly(st.sampled_from([0, 0.7, 0.7, 1.5, 1e308, -1])),
        "top_p": mostly(st.sampled_from([1, 1, 0.5, 0, 2])),
        "top_k": mostly(st.sampled_from([0, 0, 1, 40, -3])),
        "min_p": mostly(st.sampled_from([0, 0, 0.1])),
        "seed": mostly(st.none() | number),
        "stop": mostly(st.lists(text, max_size=3) | text),
        "stream": mostly(st.booleans()),
        "stream_options": mostly(st.fixed_dictionaries({}, optional={"include_usage": st.booleans()})),
        "n": mostly(st.sampled_from([None, 1, 2])),
        "user": mostly(text),
        "trimix": mostly(trimix_obj),
        "logit_bias": mostly(st.none() | st.just({})),
    }
    prompt = mostly(text | st.lists(text, min_size=1, max_size=2) | st.lists(st.integers(-5, 300), max_size=6))
    completion = st.fixed_dictionaries({"prompt": prompt}, optional=common)
    role = st.sampled_from(["user", "assistant", "system", "tool"])
    message = st.fixed_dictionaries({"role": mostly(role), "content": mostly(text)})
    chat = st.fixed_dictionaries({"messages": mostly(st.lists(message, max_size=3))}, optional=common)
    raw = st.binary(max_size=64) | anything.map(lambda v: json.dumps(v).encode())
    request = st.one_of(
        st.tuples(st.just(C), completion.map(lambda b: json.dumps(b).encode())),
        st.tuples(st.just(CH), chat.map(lambda b: json.dumps(b).encode())),
        st.tuples(st.sampled_from([C, CH]), raw),
    )
    content_type = st.sampled_from(["application/json"] * 8 + ["application/json; charset=utf-8", "text/plain", ""])
    seen: list[int] = []

    with httpx.Client(base_url=tiny.url, timeout=60) as http:

        @settings(
            max_examples=300,
            derandomize=True,  # a fixed seed: the same requests on every run
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(request, content_type)
        def check(req: tuple[str, bytes], ctype: str) -> None:
            path, body = req
            r = http.post(path, content=body, headers={"Content-Type": ctype})
            seen.append(r.status_code)
            assert r.status_code < 500 or r.status_code == 503, (path, body[:300], r.status_code, r.text)
            if not ctype.startswith("application/json"):
                assert r.status_code == 415, (ctype, r.status_code)
            if r.headers.get("content-type", "").startswith("application/json"):
                _strict_json(r.text)
            assert tiny.proc.poll() is None, f"the server exited on {body[:300]!r}:\n{tiny.log()}"
            assert http.get("/health").status_code == 200
            assert "Traceback" not in tiny.log(), f"after {body[:300]!r}:\n{tiny.log()}"

        check()
    assert len(seen) >= 200
    print("statuses:", sorted((s, seen.count(s)) for s in set(seen)))
    assert seen.count(200) >= 30 and seen.count(400) >= 30  # it reached the engine and the checks
