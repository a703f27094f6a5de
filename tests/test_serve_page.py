"""The chat page of ``trimix serve`` in a real browser (Debian's chromium through Playwright), and the
server-side pieces it stands on: fresh seeds, the server's defaults, the methods it loaded.

The browser tests run at a phone's size (390x844) and a desktop's (1280x800) against real servers
(the demo trio, or the tiny test models) and save screenshots as artifacts: in the folder named by
``$TRIMIX_SCREENSHOTS`` when set, else in pytest's temporary folder (the path is printed). The
accessibility check runs axe-core inside the page; the test takes it from ``$TRIMIX_AXE`` (a path to
``axe.min.js``), from ``.cache/axe-core/`` (which ``.ci/run`` fills with ``npm pack axe-core``), or
fetches it there with npm itself, and skips with the reason when none of these can work.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

for _mod in ("starlette", "uvicorn", "pydantic", "jinja2", "httpx"):
    pytest.importorskip(_mod, reason="trimix serve's tests need the [serve] extra and httpx ([test])")

from commands import trimix  # noqa: E402
from serving import CHROMIUM_FLAGS, UG, start_server  # noqa: E402

from trimix_cpp.server.defaults import ServeDefaults, available_methods  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BO = "བོད་ཡིག་ནི་བོད་ཀྱི་ཡི་གེ་ཡིན།"
SIZES = {"phone": {"width": 390, "height": 844}, "desktop": {"width": 1280, "height": 800}}
FLAGS = CHROMIUM_FLAGS
TIBETAN_FONT = Path("/usr/share/fonts/truetype/noto/NotoSerifTibetan-Regular.ttf")
C = "/v1/completions"


# -- server side: seeds, defaults, what the page is told ---------------------------------------------


@pytest.fixture(scope="module")
def tiny_app(tiny_trio):
    """A TrimixServer on the tiny trio with non-default defaults, driven in-process."""
    from starlette.testclient import TestClient

    import trimix_cpp as tm
    from trimix_cpp.modelset import ModelSet
    from trimix_cpp.server import EngineWorker, ServerConfig, TrimixServer

    paths = {r: tiny_trio[r] for r in ("large_ins", "small_cpt", "small_base")}
    worker = EngineWorker(
        lambda: tm.Engine(paths, tm.LoadOptions(n_ctx=256, n_gpu_layers=0, n_threads=1, n_seq=2)),
        lambda engine: server.on_loaded(engine),
    )
    defaults = ServeDefaults(method="proxy", beta=0.5, temperature=0.8, page="chat")
    server = TrimixServer(ModelSet(None, {}), worker, ServerConfig(defaults=defaults))
    worker.start()
    assert worker.ready.wait(120) and worker.loaded
    try:
        with TestClient(server.app, base_url="http://localhost") as http:
            yield http
    finally:
        worker.stop()


def test_a_sampled_request_without_a_seed_gets_a_fresh_one_it_can_repeat(tiny_app):
    body = {"prompt": "the cat", "max_tokens": 24, "stop": [], "temperature": 1.5}
    first = tiny_app.post(C, json=body).json()
    second = tiny_app.post(C, json=body).json()
    s1, s2 = first["trimix"]["sampling"], second["trimix"]["sampling"]
    assert isinstance(s1["seed"], int) and 0 <= s1["seed"] < 2**32
    assert s1["seed"] != s2["seed"]
    assert first["choices"][0]["text"] != second["choices"][0]["text"]
    again = tiny_app.post(C, json=body | {"seed": s2["seed"]}).json()
    assert again["choices"][0]["text"] == second["choices"][0]["text"]
    assert again["trimix"]["sampling"] == s2
    greedy = tiny_app.post(C, json=body | {"temperature": 0}).json()
    assert greedy["trimix"]["sampling"] == {"temperature": 0.0}
    penalised = tiny_app.post(C, json=body | {"temperature": 0, "repeat_penalty": 1.3}).json()["trimix"]["sampling"]
    assert penalised["repeat_penalty"] == 1.3 and penalised["repeat_last_n"] == 64 and "seed" not in penalised


def test_the_servers_defaults_apply_where_a_request_says_nothing(tiny_app):
    card = tiny_app.get("/v1/models").json()["data"][0]["trimix"]
    assert card["methods"] == ["trimix", "proxy", "contrastive", "single"]  # no large-base model: no trimix4
    assert card["defaults"] == {"method": "proxy", "beta": 0.5, "temperature": 0.8, "page": "chat"}
    assert card["chat"] is False  # the tiny models have no chat template
    plain = tiny_app.post(C, json={"prompt": "the cat", "max_tokens": 4}).json()["trimix"]
    assert plain["method"] == "proxy" and plain["weights"]["small_cpt"] == 0.5
    assert plain["sampling"]["temperature"] == 0.8 and "seed" in plain["sampling"]
    # another method gets exactly what it asked for: proxy's beta does not leak into TriMix
    other = tiny_app.post(C, json={"prompt": "the cat", "max_tokens": 4, "trimix": {"method": "trimix"}}).json()
    assert other["trimix"]["method"] == "trimix" and other["trimix"]["selection"]["strategy"] == "ppl"
    own = tiny_app.post(C, json={"prompt": "the cat", "max_tokens": 4, "trimix": {"beta": 2.0}}).json()
    assert own["trimix"]["weights"]["small_cpt"] == 2.0
    greedy = tiny_app.post(C, json={"prompt": "the cat", "max_tokens": 4, "temperature": 0}).json()
    assert greedy["trimix"]["sampling"] == {"temperature": 0.0}


def _turns(http, texts: list[str]) -> list[dict]:
    """A growing text continued turn by turn (each prompt repeats the last one and its reply)."""
    prompt, out = "", []
    for t in texts:
        prompt += t
        body = {"prompt": prompt, "max_tokens": 6, "stop": [], "temperature": 0, "trimix": {"method": "trimix"}}
        r = http.post(C, json=body).json()
        out.append(r)
        prompt += r["choices"][0]["text"]
    return out


def test_a_conversations_next_turn_reuses_its_cached_prefix(tiny_trio, tiny_app):
    """The next turn evaluates only its new tokens, with the same text and the same perplexity grid as
    a server that evaluates everything again."""
    from starlette.testclient import TestClient

    import trimix_cpp as tm
    from trimix_cpp.modelset import ModelSet
    from trimix_cpp.server import EngineWorker, ServerConfig, TrimixServer

    texts = ["the cat sat on the mat", " and the dog", " then they both", " went home"]
    kept = _turns(tiny_app, texts)
    paths = {r: tiny_trio[r] for r in ("large_ins", "small_cpt", "small_base")}
    worker = EngineWorker(
        lambda: tm.Engine(paths, tm.LoadOptions(n_ctx=256, n_gpu_layers=0, n_threads=1, n_seq=2)),
        lambda engine: server.on_loaded(engine),
        keep_conversations=False,
    )
    server = TrimixServer(ModelSet(None, {}), worker, ServerConfig())
    worker.start()
    assert worker.ready.wait(120) and worker.loaded
    try:
        with TestClient(server.app, base_url="http://localhost") as http:
            fresh = _turns(http, texts)
    finally:
        worker.stop()
    for k, (a, b) in enumerate(zip(kept, fresh)):
        assert a["choices"][0]["text"] == b["choices"][0]["text"], k
        assert a["usage"]["prompt_tokens"] == b["usage"]["prompt_tokens"], k
        assert b["trimix"]["timings"]["cached_tokens"] == 0
        ga, gb = a["trimix"]["selection"], b["trimix"]["selection"]
        assert ga["chosen"] == gb["chosen"], k
        for x, y in zip(ga["grid"], gb["grid"]):
            assert x["nll"] == pytest.approx(y["nll"], abs=1e-5), k
    for k in range(1, len(texts)):
        # the last prompt, less the token or two its joint with the reply's text may tokenize into
        # differently (and the reply's tokens too, where its text tokenizes back to them)
        before = kept[k - 1]["usage"]
        cached = kept[k]["trimix"]["timings"]["cached_tokens"]
        assert cached >= before["prompt_tokens"] - 2, (k, cached, before)
    health = tiny_app.get("/health").json()
    assert health["kv_cells_cached"] > 0 and health["kv_cells_free"] == health["kv_cells"]


def test_defaults_are_checked_like_the_command_line():
    from trimix_cpp.errors import TrimixError
    from trimix_cpp.profiles import find_profile

    demo = find_profile("demo")
    assert demo.page == "complete"  # the demo trio continues text
    d = ServeDefaults().resolved(demo)
    assert (d.method, d.select, d.page, d.temperature) == ("trimix", "ppl", "complete", None)
    assert ServeDefaults(alpha=0.3, beta=0.6).resolved(demo).select == "fixed"
    assert ServeDefaults(page="chat").resolved(demo).page == "chat"
    with pytest.raises(TrimixError, match=r"^method proxy takes no alpha"):
        ServeDefaults(method="proxy", alpha=0.3).resolved(None)
    with pytest.raises(TrimixError, match=r"^page must be chat or complete"):
        ServeDefaults(page="novel").resolved(None)
    with pytest.raises(TrimixError, match=r"^temperature must be a finite number >= 0"):
        ServeDefaults(temperature=-1).resolved(None)
    assert available_methods(("large_ins",)) == ["single"]
    assert "trimix4" in available_methods(("large_ins", "small_cpt", "small_base", "large_base"))


@pytest.mark.slow
def test_serve_refuses_bad_defaults_in_one_line(tiny_trio):
    roles = [f"--{r.replace('_', '-')}={tiny_trio[r]}" for r in ("large_ins", "small_cpt", "small_base")]
    for args, needle in (
        (["--method", "proxy", "--alpha", "0.3"], "--method proxy takes no --alpha"),
        (["--page", "novel"], "--page must be chat or complete"),
        (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    ):
        r = trimix("serve", *roles, "--port", "0", *args)
        err = r.stderr.decode()
        assert r.returncode == 1 and needle in err and len(err.strip().splitlines()) == 1, err


# -- the browser ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser_path():
    pytest.importorskip("playwright.sync_api", reason="the browser tests need the playwright package ([test])")
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no chromium binary (apt-get install chromium) for the browser tests")


@pytest.fixture(scope="module")
def playwright(browser_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright, browser_path):
    b = playwright.chromium.launch(executable_path=browser_path, args=FLAGS)
    yield b
    b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    where = os.environ.get("TRIMIX_SCREENSHOTS")
    path = Path(where) if where else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    print(f"screenshots in {path}")
    return path


@pytest.fixture(scope="module")
def demo3():
    """The demo trio with three sequences in parallel, so a compare decodes its three answers together."""
    server = start_server("--lang", "demo", "--parallel", "3", "--queue", "4")
    yield server
    assert server.stop() == 0, server.log()
    assert "Traceback" not in server.log(), server.log()


class Page:
    """One browser page on a server, with the checks every test wants: no script errors."""

    def __init__(self, browser, url: str, size: str = "desktop") -> None:
        self.context = browser.new_context(viewport=SIZES[size], accept_downloads=True)
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.urls: list[str] = []
        self.page.on("request", lambda r: self.urls.append(r.url))
        self.page.on("pageerror", lambda e: self.problems.append(str(e)))
        self.page.on(
            "console",
            lambda m: (
                self.problems.append(m.text) if m.type == "error" and "Failed to load resource" not in m.text else None
            ),
        )
        self.url = url
        self.page.goto(url + "/")

    def close(self) -> None:
        self.context.close()

    def connected(self, name: str = "trimix-demo") -> None:
        self.page.locator("#model", has_text=name).wait_for(timeout=60_000)

    def settings(self, **values: str) -> None:
        p = self.page
        if p.locator("#settings").is_hidden():
            p.click("#settings-toggle")
        for k, v in values.items():
            p.fill(f"#{k}", v)
        p.click("#settings-close")

    def send(self, text: str) -> None:
        n = self.page.locator(".msg.assistant[data-done='true']").count()
        self.page.fill("#input", text)
        self.page.click("#send")
        self.page.locator(".msg.assistant[data-done='true']").nth(n).wait_for(timeout=180_000)

    def last_reply(self):
        return self.page.locator(".msg.assistant").last

    def reply_text(self) -> str:
        return self.last_reply().locator(":scope > .body").inner_text()

    def reply_seed(self) -> int:
        meta = self.last_reply().locator(":scope > .meta").inner_text()
        m = re.search(r"seed (\d+)", meta)
        assert m, meta
        return int(m.group(1))

    def wait_idle(self) -> None:
        self.page.locator("#send:not([disabled])").wait_for(timeout=180_000)


def no_overflow(page) -> None:
    width = page.evaluate("document.documentElement.scrollWidth")
    body = page.evaluate("document.body.scrollWidth")
    inner = page.evaluate("window.innerWidth")
    assert width == inner and body <= inner, (width, body, inner)


def check_controls(page, scope: str, viewport: dict) -> int:
    """Every visible control inside ``scope``: at least 44x44 px, inside the viewport's width, and
    clickable (Playwright's actionability checks: visible, stable, enabled, not covered)."""
    kinds = ":is(button, input, select, textarea, a[href]):visible"
    controls = page.locator(", ".join(f"{part.strip()} {kinds}" for part in scope.split(",")))
    n = controls.count()
    assert n > 0, scope
    for i in range(n):
        c = controls.nth(i)
        c.scroll_into_view_if_needed()
        box = c.bounding_box()
        what = c.evaluate("e => e.outerHTML.slice(0, 120)")
        assert box is not None, what
        assert box["width"] >= 44 - 0.5 and box["height"] >= 44 - 0.5, (what, box)
        assert box["x"] >= -0.5 and box["x"] + box["width"] <= viewport["width"] + 0.5, (what, box)
        if c.is_enabled():
            c.click(trial=True, timeout=5_000)
    return n


@pytest.mark.slow
@pytest.mark.parametrize("size", ["phone", "desktop"])
def test_layout_controls_and_only_loaded_methods(browser, demo3, shots, size):
    pg = Page(browser, demo3.url, size)
    page, vp = pg.page, SIZES[size]
    try:
        pg.connected()
        # only the methods the server loaded (no large-base model: no trimix4), and its default mode
        methods = page.eval_on_selector_all("#method option", "os => os.map(o => o.value)")
        assert methods == ["", "trimix", "proxy", "contrastive", "single"], methods
        assert "continue text" in page.locator("#mode option").first.inner_text()
        pg.settings(max_tokens="12")
        pg.send(UG)
        page.locator(".details-toggle").last.click()
        page.screenshot(path=str(shots / f"{size}-reply.png"))
        no_overflow(page)
        header = page.locator(".bar").bounding_box()
        assert header["height"] <= 60, header  # one line
        counts = {
            "chat": check_controls(page, "body > :not(.layout), .main", vp),
        }
        page.click("#settings-toggle")
        page.fill("#temperature", "0.7")  # shows the sampling fields
        page.select_option("#select", "fixed")  # shows alpha and beta
        page.screenshot(path=str(shots / f"{size}-settings.png"))
        no_overflow(page)
        counts["settings"] = check_controls(page, "#settings", vp)
        check_controls(page, ".composer", vp)  # the chat stays usable under the sheet
        page.fill("#temperature", "")
        page.select_option("#select", "")
        page.click("#settings-close")
        if page.locator("#chats").is_hidden():
            page.click("#chats-toggle")
        page.screenshot(path=str(shots / f"{size}-conversations.png"))
        no_overflow(page)
        counts["conversations"] = check_controls(page, "#chats", vp)
        if size == "phone":
            page.click("#chats-close")
        page.click("#model")
        page.screenshot(path=str(shots / f"{size}-model-info.png"))
        assert "large-ins" in page.locator("#model-info").inner_text()
        no_overflow(page)
        page.click("#model")
        assert counts["settings"] >= 14 and counts["chat"] >= 8 and counts["conversations"] >= 5, counts
    finally:
        pg.close()
    assert not pg.problems, pg.problems
    # offline: everything the page loads comes from the server itself
    elsewhere = [u for u in pg.urls if not u.startswith((demo3.url + "/", "data:", "blob:"))]
    assert pg.urls and not elsewhere, elsewhere


def _sse_final(body: bytes) -> dict:
    """The ``trimix`` object of a finished stream."""
    for line in body.decode().splitlines():
        if line.startswith("data: {") and '"trimix"' in line:
            return json.loads(line[6:])["trimix"]
    raise AssertionError("no trimix object in the stream")


@pytest.mark.slow
def test_conversations_seeds_heatmap_and_compare(browser, demo3, shots):
    pg = Page(browser, demo3.url, "desktop")
    page = pg.page
    responses = []
    page.on("response", lambda r: responses.append(r) if r.request.method == "POST" else None)
    try:
        pg.connected()
        # sampled, a fixed length (a stop string the demo never writes), random seeds
        pg.settings(temperature="0.9", max_tokens="16", stop="@@@")
        pg.send(UG)
        first, seed1 = pg.reply_text(), pg.reply_seed()
        # the heatmap's chosen cell is the response's chosen pair, and the reply's weights
        final = _sse_final(responses[-1].body())
        chosen = final["selection"]["chosen"]
        page.locator(".details-toggle").last.click()
        cells = pg.last_reply().locator(".heatmap td[data-alpha]")
        assert cells.count() == len(final["selection"]["grid"]) == 36
        cell = pg.last_reply().locator(".heatmap td.chosen")
        assert cell.count() == 1
        assert float(cell.get_attribute("data-alpha")) == chosen["alpha"]
        assert float(cell.get_attribute("data-beta")) == chosen["beta"]
        assert final["weights"]["large_ins"] == chosen["alpha"] and final["weights"]["small_cpt"] == chosen["beta"]
        best = min(final["selection"]["grid"], key=lambda g: g["nll"])
        assert (best["alpha"], best["beta"]) == (chosen["alpha"], chosen["beta"])
        own = pg.last_reply().locator(".own-ppl").inner_text()
        assert all(r in own for r in ("large_ins", "small_cpt", "small_base")), own
        assert f"seed\n{seed1}" in pg.last_reply().locator(".details").inner_text().replace("\t", "\n")
        page.screenshot(path=str(shots / "desktop-heatmap.png"))

        # regenerate: a fresh random seed, a different sample
        page.locator(".msg.assistant .regenerate").click()
        page.locator(".msg.assistant[data-done='true'] .regenerate").wait_for(timeout=180_000)
        second, seed2 = pg.reply_text(), pg.reply_seed()
        assert seed2 != seed1 and second != first, (first, second)
        # the same seed again: the same text
        page.locator(".details-toggle").last.click()
        page.locator(".repeat-seed").click()
        page.locator(".msg.assistant[data-done='true'] .regenerate").wait_for(timeout=180_000)
        assert (pg.reply_text(), pg.reply_seed()) == (second, seed2)

        # compare: three methods answer the same turn, sent together (the server batches them)
        posts = len(responses)
        sent: list[str] = []
        page.on("request", lambda r: sent.append("request") if r.method == "POST" else None)
        page.on("requestfinished", lambda r: sent.append("finished") if r.method == "POST" else None)
        page.locator(".msg.assistant .compare-button").click()
        page.locator(".compare-col").nth(2).wait_for(timeout=10_000)
        page.locator(".compare-col.waiting").first.wait_for(state="detached", timeout=180_000)
        cols = page.locator(".compare-col")
        assert cols.count() == 3
        labels = [cols.nth(i).locator("h3").inner_text() for i in range(3)]
        assert labels == ["large-ins alone", "proxy tuning", "TriMix"], labels
        assert page.locator(".compare-col.failed").count() == 0
        for i in range(3):
            assert cols.nth(i).locator(".meta").inner_text(), i
        methods = [json.loads(r.request.post_data)["trimix"]["method"] for r in responses[posts:]]
        assert sorted(methods) == ["proxy", "single", "trimix"], methods
        assert sent[:3] == ["request"] * 3, sent  # all three in flight before the first answer
        page.screenshot(path=str(shots / "desktop-compare.png"), full_page=True)

        # the conversation survives a reload, with its compare; a second one; rename; delete; export
        shown = pg.reply_text()
        page.reload()
        pg.connected()
        assert pg.reply_text() == shown and page.locator(".msg.user .body").inner_text() == UG
        assert page.locator(".compare-col").count() == 3
        page.click("#new-chat")
        pg.settings(temperature="", max_tokens="6", stop="")
        pg.send("ئالاقە")
        items = page.locator("#chat-list li")
        assert items.count() == 2
        items.nth(1).locator("button.icon").first.click()  # rename the older one
        page.fill("#chat-list .rename-input", "My Uyghur test")
        page.keyboard.press("Enter")
        page.locator("#chat-list li", has_text="My Uyghur test").locator(".open").click()
        assert page.locator(".msg.user .body").first.inner_text() == UG
        with page.expect_download() as dl:
            page.click("#export-json")
        saved = json.loads(Path(dl.value.path()).read_text(encoding="utf-8"))
        assert saved["title"] == "My Uyghur test" and saved["turns"][0]["content"] == UG
        assert saved["turns"][1]["content"] == shown and saved["turns"][1]["info"]["sampling"]["seed"] == seed2
        with page.expect_download() as dl:
            page.click("#export-md")
        md = Path(dl.value.path()).read_text(encoding="utf-8")
        assert md.startswith("# My Uyghur test") and UG in md and shown in md
        other = page.locator("#chat-list li", has_text="ئالاقە")
        other.locator("button.icon").nth(1).click()
        other.locator("button", has_text="Delete?").click()
        assert page.locator("#chat-list li").count() == 1
        page.reload()
        pg.connected()
        assert page.locator("#chat-list li").count() == 1
    finally:
        pg.close()
    assert not pg.problems, pg.problems


@pytest.mark.slow
def test_stop_keeps_what_is_shown_and_sends_it(browser, demo3):
    pg = Page(browser, demo3.url, "phone")
    page = pg.page
    requests: list[dict] = []
    page.on("request", lambda r: requests.append(json.loads(r.post_data)) if r.method == "POST" else None)
    try:
        pg.connected()
        page.click("#settings-toggle")
        page.select_option("#mode", "chat")
        page.fill("#max_tokens", "400")
        page.fill("#stop", "@@@")
        page.click("#settings-close")
        page.fill("#input", "Say something long.")
        page.click("#send")
        page.locator(".msg.assistant .body").filter(has_text=re.compile(r"\S{3}")).wait_for(timeout=120_000)
        page.click("#stop-button")
        stopped = page.locator(".msg.assistant.stopped")
        stopped.wait_for(timeout=30_000)
        shown = stopped.locator(".body").inner_text()
        assert "stopped by you" in stopped.locator(".meta").inner_text()
        pg.wait_idle()
        pg.settings(max_tokens="4")
        pg.send("And then?")
        sent = requests[-1]["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "user"]
        assert sent[1]["content"].strip() == shown.strip()  # exactly what the page shows
    finally:
        pg.close()
    assert not pg.problems, pg.problems


@pytest.mark.slow
def test_api_key_flow_then_server_stopped(browser, tiny_trio, tmp_path, shots):
    key_file = tmp_path / "key.txt"
    key_file.write_text("page-key-123\n", encoding="utf-8")
    roles = [f"--{r.replace('_', '-')}={tiny_trio[r]}" for r in ("large_ins", "small_cpt", "small_base")]
    server = start_server(*roles, "--n-ctx", "256", "--api-key-file", str(key_file))
    pg = Page(browser, server.url, "phone")
    page = pg.page
    try:
        banner = page.locator("#banner")
        banner.locator("#key-form").wait_for(timeout=30_000)
        assert "needs an API key" in banner.inner_text()
        page.screenshot(path=str(shots / "phone-api-key.png"))
        page.fill("#key-input", "wrong-key")
        page.click("#key-form button")
        page.locator("#banner", has_text="was not accepted").wait_for(timeout=30_000)
        page.fill("#key-input", "page-key-123")
        page.click("#key-form button")
        pg.connected("trimix")
        assert banner.is_hidden()
        # no chat template in the tiny models: the page starts in text continuation
        assert "continue text" in page.locator("#mode option").first.inner_text()
        pg.settings(max_tokens="4")
        pg.send("the cat")
        page.reload()
        pg.connected("trimix")  # the key was kept in this browser
        assert banner.is_hidden()
        # a prompt longer than the context: said plainly, with what to do
        page.fill("#input", "the cat sat on the mat " * 60)
        page.click("#send")
        page.locator(".notice").wait_for(timeout=30_000)
        assert "longer than the models can read" in page.locator(".notice").inner_text()
        page.locator(".msg.user").last.locator("button", has_text="Delete").click()

        assert server.stop() == 0
        page.fill("#input", "the dog")
        page.click("#send")
        notice = page.locator(".notice")
        notice.wait_for(timeout=30_000)
        text = notice.inner_text()
        assert "cannot be reached" in text and "Retry" in text, text
        assert "Failed to fetch" not in page.locator("body").inner_text()
        assert "server unreachable" in page.locator("#model").inner_text()
        assert "cannot be reached" in banner.inner_text()
        page.screenshot(path=str(shots / "phone-server-stopped.png"))
        # the user's message stays; the failed reply is not kept
        assert page.locator(".msg.user").count() == 2 and page.locator(".msg.assistant").count() == 1
    finally:
        pg.close()
        server.stop()
    assert "Traceback" not in server.log()


@pytest.mark.slow
def test_a_busy_server_says_when_to_try_again(browser):
    """With every place taken, the page says the server is busy and when to try again."""
    import threading

    import httpx

    server = start_server("--lang", "demo", "--parallel", "1", "--queue", "0")
    holding = threading.Event()
    release = threading.Event()

    def hold() -> None:  # a long stream that keeps the only place until released
        body = {"prompt": UG, "max_tokens": 1000, "stop": [], "stream": True}
        with httpx.stream("POST", server.url + C, json=body, timeout=300, trust_env=False) as r:
            for _ in r.iter_lines():
                holding.set()
                if release.is_set():
                    return

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    pg = Page(browser, server.url, "phone")
    page = pg.page
    try:
        pg.connected()
        assert holding.wait(60)
        page.fill("#input", UG)
        page.click("#send")
        notice = page.locator(".notice[data-kind='busy']")
        notice.wait_for(timeout=30_000)
        text = notice.inner_text()
        assert "busy" in text and re.search(r"Try again in \d+ seconds?", text), text
        release.set()
        holder.join(60)
        pg.settings(max_tokens="4")
        notice.locator("button:not([disabled])").click(timeout=30_000)  # enabled once Retry-After has passed
        page.locator(".msg.assistant[data-done='true']").wait_for(timeout=60_000)
    finally:
        release.set()
        pg.close()
        server.stop()
    assert not pg.problems, pg.problems


def _fontconfig_without_noto(tmp_path: Path) -> Path:
    """A fontconfig setup with DejaVu only: a machine without a Tibetan font."""
    dejavu = Path("/usr/share/fonts/truetype/dejavu")
    if not dejavu.is_dir():
        pytest.skip("no DejaVu fonts (fonts-dejavu-core) to build a font setup without Tibetan")
    conf = tmp_path / "fonts.conf"
    cache = tmp_path / "fc-cache"
    conf.write_text(
        f'<?xml version="1.0"?>\n<!DOCTYPE fontconfig SYSTEM "fonts.dtd">\n<fontconfig>\n'
        f"<dir>{dejavu}</dir>\n<cachedir>{cache}</cachedir>\n</fontconfig>\n",
        encoding="utf-8",
    )
    return conf


@pytest.mark.slow
def test_font_note_names_the_font_to_install(playwright, browser_path, browser, demo3, tmp_path, shots):
    conf = _fontconfig_without_noto(tmp_path)
    bare = playwright.chromium.launch(
        executable_path=browser_path, args=FLAGS, env=dict(os.environ, FONTCONFIG_FILE=str(conf))
    )
    try:
        pg = Page(bare, demo3.url, "phone")
        pg.connected()
        pg.page.fill("#input", BO)
        note = pg.page.locator("#font-note")
        note.wait_for(timeout=10_000)
        text = note.inner_text()
        assert "Tibetan" in text and "fonts-noto-core" in text and "Noto Serif Tibetan" in text, text
        assert "Microsoft Himalaya" in text and "Kailasa" in text
        pg.page.screenshot(path=str(shots / "phone-font-note.png"))
        pg.page.fill("#input", "plain English")
        note.wait_for(state="hidden", timeout=10_000)
        pg.close()
    finally:
        bare.close()
    if not TIBETAN_FONT.is_file():
        return  # the machine's own fonts lack Tibetan too; the other half needs fonts-noto-core
    pg = Page(browser, demo3.url, "phone")
    try:
        pg.connected()
        pg.page.fill("#input", BO + " " + UG)
        pg.page.wait_for_timeout(600)
        assert pg.page.locator("#font-note").is_hidden()
    finally:
        pg.close()


# -- accessibility: axe-core inside the page --------------------------------------------------------------------


def _axe_source() -> str:
    given = os.environ.get("TRIMIX_AXE")
    if given:
        return Path(given).read_text(encoding="utf-8")
    cache = ROOT / ".cache" / "axe-core"
    script = cache / "package" / "axe.min.js"
    if not script.is_file():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("axe-core is not in .cache/axe-core and npm is missing to fetch it (npm pack axe-core)")
        cache.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([npm, "pack", "axe-core@4", "--silent"], cwd=cache, capture_output=True, timeout=300)
        packs = sorted(cache.glob("axe-core-*.tgz"))
        if r.returncode != 0 or not packs:
            pytest.skip(f"npm could not fetch axe-core: {r.stderr.decode(errors='replace').strip()[-200:]}")
        with tarfile.open(packs[-1]) as tar:
            tar.extract("package/axe.min.js", cache, filter="data")
    return script.read_text(encoding="utf-8")


@pytest.mark.slow
@pytest.mark.parametrize("size", ["phone", "desktop"])
def test_accessibility_has_no_serious_problems(browser, demo3, size):
    axe = _axe_source()
    pg = Page(browser, demo3.url, size)
    page = pg.page
    found: dict[str, list] = {}
    try:
        pg.connected()
        pg.settings(max_tokens="8")
        pg.send(UG)
        page.locator(".details-toggle").last.click()
        page.evaluate(axe)

        def run(state: str) -> None:
            result = page.evaluate("async () => await axe.run(document, {resultTypes: ['violations']})")
            bad = [v for v in result["violations"] if v["impact"] in ("serious", "critical")]
            found[state] = [(v["id"], v["help"], [n["target"] for n in v["nodes"]][:5]) for v in bad]

        run("reply with details")
        page.click("#settings-toggle")
        run("settings open")
        page.click("#settings-close")
        if page.locator("#chats").is_hidden():
            page.click("#chats-toggle")
        run("conversations open")
    finally:
        pg.close()
    assert not any(found.values()), found
