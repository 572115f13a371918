"""The web playground at / driven in headless Chromium (playwright, sync API) against a real `quill serve`.

One server for the module, with two models and an API key: the bundled `shakespeare` when it is installed
(else a tiny random stand-in, `small`) and `long`, a tiny random model with a 4096-token context for long
generations. Every test saves a screenshot: into the test's scratch folder, or into docs/screenshots/ (fixed
names, overwritten) with QUILL_SCREENSHOTS=1, so that a test run leaves the checkout as it found it.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from conftest import CHAT_TEMPLATE, ROOT, make_tiny_model

playwright_sync = pytest.importorskip("playwright.sync_api")
expect = playwright_sync.expect

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = ROOT / "docs" / "screenshots" if os.environ.get("QUILL_SCREENSHOTS") == "1" else \
    Path(tempfile.mkdtemp(prefix="quill-screenshots-"))
BUNDLED = (ROOT / "quill" / "models" / "shakespeare" / "config.json").exists()
KEY, ADMIN = "web-key", "web-admin"
PROMPT = "ROMEO:\n"
STREAM_TOKENS = 400  # long enough to see it stream in on a busy machine (a few frames at least)
TIMEOUT = 30_000  # ms, for expectations on a busy machine

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed (make install-test)")


# ---- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(serve, tmp_path_factory):
    work = tmp_path_factory.mktemp("web")
    first = "shakespeare" if BUNDLED else \
        f"small={make_tiny_model(work / 'small', chat_template=CHAT_TEMPLATE, n_positions=512, n_embd=96, n_layer=3)}"
    long_dir = make_tiny_model(work / "long", n_positions=4096, n_embd=64, seed=1)
    return serve(first, f"long={long_dir}", "--api-key", KEY, "--admin-key", ADMIN, "--store", work / "store",
                 "--max-batch", 2).wait_ready()


@pytest.fixture(scope="module")
def default_model(server) -> str:
    return "shakespeare" if BUNDLED else "small"


@pytest.fixture(scope="module")
def stream_tokens(server, default_model) -> int:
    """Tokens for the streaming test: STREAM_TOKENS, or fewer where the default model's context is shorter."""
    cards = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
    context = next(m["context_length"] for m in cards["data"] if m["id"] == default_model)
    return min(STREAM_TOKENS, context - 16)


@pytest.fixture(scope="module")
def browser():
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


class Page:
    """A page of the playground in its own browser context, plus what it asked the network and logged."""

    def __init__(self, browser, server, *, key: str | None = KEY, width: int = 1280, height: int = 900):
        self.server = server
        self.context = browser.new_context(viewport={"width": width, "height": height})
        if key is not None:
            self.context.add_init_script(f"sessionStorage.setItem('quill.apiKey', {key!r})")
        self.requests: list[str] = []
        self.problems: list[str] = []
        self.context.on("request", lambda r: self.requests.append(r.url))
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT)
        self.page.on("pageerror", lambda e: self.problems.append(f"uncaught: {e}"))
        self.page.on("console", lambda m: self.problems.append(m.text)
                     if m.type == "error" and "Content Security Policy" in m.text else None)

    def open(self) -> Page:
        self.page.goto(self.server.url + "/")
        return self

    def models_ready(self) -> None:
        expect(self.page.locator("#model option")).not_to_have_count(0)

    def fill(self, **fields) -> None:
        for name, value in fields.items():
            self.page.fill(f"#{name}", str(value))

    def generate(self) -> None:
        self.page.click("#generate")

    def throttle(self, bytes_per_s: int = 400_000) -> None:
        """Deliver responses at `bytes_per_s`: a small model can generate every token within two of the page's
        draws (at most one a frame, or 100 ms in a hidden tab), and a long stream before a test can press Stop;
        throttled, a stream (~1.7 KB a token) takes about a second per 240 tokens on any machine."""
        cdp = self.context.new_cdp_session(self.page)
        cdp.send("Network.enable")
        cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "uploadThroughput": -1,
                                                      "downloadThroughput": bytes_per_s})

    def wait_finished(self, reason: str | None = None) -> str:
        finish = self.page.locator("#stat-finish")
        expect(self.page.locator("#generate")).to_be_enabled(timeout=TIMEOUT)
        if reason is not None:
            expect(finish).to_have_attribute("data-reason", reason)
        return finish.get_attribute("data-reason") or ""

    def output(self) -> str:
        return self.page.locator("#out-text").text_content() or ""

    def shot(self, name: str, full_page: bool = False) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / name), full_page=full_page)

    def close(self) -> None:
        self.context.close()
        origin = self.server.url
        foreign = [u for u in self.requests if not (u.startswith(origin + "/") or u.startswith("data:"))]
        assert not foreign, f"the page fetched from elsewhere: {foreign}"
        assert not self.problems, self.problems


@pytest.fixture
def page(browser, server):
    p = Page(browser, server).open()
    p.models_ready()
    yield p
    p.close()


def api(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def active_slots(server, model: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    m = re.search(rf'^quill_active_slots\{{model="{re.escape(model)}"\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


# ---- tests -------------------------------------------------------------------------------------------------------


def test_page_is_served_self_contained(server):
    r = httpx.get(server.url + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert "<script src=\"/static/app.js\"" in r.text and "http" not in r.text.split("<body>")[0].replace(
        "http-equiv", "")
    for asset in ("/static/app.js", "/static/style.css"):
        assert httpx.get(server.url + asset, timeout=10).status_code == 200
    assert httpx.get(server.url + "/static/nope.js", timeout=10).status_code == 404
    assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401  # the API stays guarded


def test_asks_for_key_then_streams(browser, server, default_model, stream_tokens):
    p = Page(browser, server, key=None).open()
    page = p.page
    expect(page.locator("#key-dialog")).to_be_visible()
    page.fill("#api-key", KEY)
    p.shot("api-key.png")
    page.click("#key-save")
    p.models_ready()
    expect(page.locator("#model")).to_have_value(default_model)
    assert page.evaluate("sessionStorage.getItem('quill.apiKey')") == KEY

    # Record every state of the output as it changes, to see it stream in.
    page.evaluate("""() => {
        window.__seen = [];
        new MutationObserver(() => window.__seen.push(document.getElementById('out-text').textContent.length))
            .observe(document.getElementById('out-text'), {childList: true, characterData: true, subtree: true});
    }""")
    p.fill(prompt=PROMPT, max_tokens=stream_tokens, temperature=0.8, seed=7)
    p.throttle()
    p.generate()
    finish = p.wait_finished()
    assert finish in ("length", "stop")
    n = int(page.locator("#stat-tokens").text_content())
    assert n == stream_tokens or finish == "stop"
    final = len(p.output())
    assert final > 0
    seen = page.evaluate("window.__seen")
    partial = {n for n in seen if 0 < n < final}
    assert len(partial) >= 2, f"the output did not stream: lengths seen {seen}"
    expect(page.locator("#key-dialog[open]")).to_have_count(0)
    assert re.fullmatch(r"\d+ ms", page.locator("#stat-ttft").text_content())
    assert "tokens/s" in page.locator("#stat-speed").text_content()
    assert "FLOP" in page.locator("#stat-flops").text_content()
    assert page.locator("#stat-model").text_content() == default_model
    assert page.locator("#out-prompt").text_content() == PROMPT
    p.shot("playground.png", full_page=True)

    # The token view: one span per token, coloured by probability, with id and probability in its tooltip.
    page.click("#view-tokens")
    tokens = page.locator("#tokens .tok")
    expect(tokens).to_have_count(n)
    title = tokens.nth(3).get_attribute("title")
    assert re.search(r"p = \d+\.\d %", title) and "id " in title
    assert "".join(page.evaluate("[...document.querySelectorAll('#tokens .tok')].map(s => s.textContent)")
                   ).replace("↵\n", "\n").replace("→\t", "\t").replace("∅", "") == p.output()
    tokens.nth(5).hover()
    expect(page.locator("#token-detail")).to_contain_text("#6")
    page.focus("#tokens")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#token-detail")).to_contain_text("#7")
    p.shot("tokens.png")
    p.close()


def test_stop_long_generation(page, server):
    pg = page.page
    pg.select_option("#model", "long")
    page.fill(prompt="The", max_tokens=4000, temperature=0)  # greedy: this model never picks EOS
    # The page stays responsive while tokens pour in: the longest gap between 20 ms timer ticks.
    pg.evaluate("""() => {
        window.__gap = 0;
        let last = performance.now();
        setInterval(() => { const now = performance.now(); window.__gap = Math.max(window.__gap, now - last); last = now; }, 20);
    }""")
    page.throttle()
    page.generate()
    expect(pg.locator("#stop-button")).to_be_enabled()
    expect(pg.locator("#generate")).to_be_disabled()
    expect(pg.locator("#out-text")).to_have_text(re.compile(r"[\s\S]{300,}"))
    assert pg.evaluate("window.__gap") < 2000, "the page froze while streaming"
    pg.click("#stop-button")
    assert page.wait_finished("stopped") == "stopped"
    expect(pg.locator("#stat-finish")).to_contain_text("stopped")
    expect(pg.locator("#stop-button")).to_be_disabled()
    stopped_at = len(page.output())
    assert 300 <= stopped_at < 4000
    deadline = time.monotonic() + 10  # the server frees the slot when the client hangs up
    while active_slots(server, "long") > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert active_slots(server, "long") == 0
    assert len(page.output()) == stopped_at
    page.shot("stop.png")
    # Usable again: a short generation after the stop.
    page.fill(max_tokens=8)
    page.generate()
    assert page.wait_finished() == "length"
    assert len(page.output()) == 8  # one character per token


def test_budget_then_continue(page, server, default_model):
    body = {"model": default_model, "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "max_flops": 1}
    r = api(server, "/v1/completions", body)  # too small for the prefill: refused, naming max_flops
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_flops"
    full = api(server, "/v1/completions", {**body, "max_flops": None}).json()
    budget = full["usage"]["flops"] // 3  # runs out about a third of the way
    pg = page.page
    page.fill(prompt=PROMPT, max_tokens=40, temperature=0, max_flops=1)
    page.generate()  # the API's 400 for a budget too small to start, next to the budget field
    expect(pg.locator("#max_flops-error")).to_contain_text("max_flops")
    expect(pg.locator("#max_flops")).to_have_attribute("aria-invalid", "true")
    page.fill(max_flops=budget)
    page.generate()
    assert page.wait_finished("budget") == "budget"
    expect(pg.locator("#continue")).to_be_visible()
    first = page.output()
    assert 0 < len(first) < 40
    page.shot("budget.png")
    pg.fill("#max_flops", "")  # the rest in one go
    pg.click("#continue")
    assert page.wait_finished() == full["choices"][0]["finish_reason"]
    expect(pg.locator("#continue")).to_be_hidden()
    assert page.output().startswith(first) and page.output() == full["choices"][0]["text"]
    expect(pg.locator("#stat-tokens")).to_have_text(f"{full['usage']['completion_tokens']} (2 calls)")
    page.shot("continue.png")


def test_cached_prompt_tokens_shown(page):
    """The second call of a prompt finds its blocks in the server's prefix cache: the stats say how many."""
    pg = page.page
    page.fill(prompt="JULIET:\nO Romeo, Romeo! wherefore art thou Romeo? Deny thy father", max_tokens=2,
              temperature=0)
    counts = []
    for _ in range(2):
        page.generate()
        page.wait_finished()
        expect(pg.locator("#stat-cached")).to_contain_text("prompt")
        m = re.fullmatch(r"(\d+) of (\d+) prompt", pg.locator("#stat-cached").text_content())
        counts.append((int(m.group(1)), int(m.group(2))))
    (first, n), (second, _) = counts
    assert first == 0 and 0 < second < n


def test_switch_models_and_chat(page, server, default_model):
    pg = page.page
    options = pg.eval_on_selector_all("#model option", "os => os.map(o => [o.value, o.textContent])")
    assert [v for v, _ in options] == [default_model, "long"]
    assert all(re.fullmatch(rf"{v} · [\d.]+[kMG]? · fp32", label) for v, label in options), options
    pg.select_option("#model", "long")
    expect(pg.locator("#model-info")).to_contain_text("context 4096 tokens")
    page.fill(prompt="abc", max_tokens=10, temperature=0)  # greedy: no end-of-text by chance
    page.generate()
    page.wait_finished("length")
    assert pg.locator("#stat-model").text_content() == "long"

    # Chat on a model without a chat template: the API's 400, next to the mode switch.
    pg.check("#mode-chat")
    expect(pg.locator("#prompt-label")).to_have_text("Message")
    page.generate()
    expect(pg.locator("#mode-error")).to_be_visible()
    expect(pg.locator("#mode-error")).to_contain_text("no chat template")
    expect(pg.locator("#generate")).to_be_enabled()

    pg.select_option("#model", default_model)
    if pg.locator("#mode-hint").text_content():  # the default model has no chat template either: done
        page.shot("models.png")
        return
    page.fill(prompt="Hello", max_tokens=12)
    page.generate()
    assert page.wait_finished() in ("length", "stop")
    expect(pg.locator("#mode-error")).to_be_hidden()
    assert pg.locator("#stat-model").text_content() == default_model
    page.shot("models.png")


def test_invalid_setting_shown_at_its_control(page):
    pg = page.page
    page.fill(prompt=PROMPT, max_tokens=5, top_p=5)
    page.generate()
    error = pg.locator("#top_p-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("top_p")
    expect(pg.locator("#top_p")).to_have_attribute("aria-invalid", "true")
    assert "top_p-error" in pg.locator("#top_p").get_attribute("aria-describedby")
    expect(pg.locator("#alert")).to_be_hidden()
    expect(pg.locator("#generate")).to_be_enabled()
    page.shot("error.png")
    # Fixing the value clears the mark; the next call works.
    page.fill(top_p=0.9)
    expect(pg.locator("#top_p-error")).to_be_hidden()
    page.generate()
    assert page.wait_finished() in ("length", "stop")


def test_phone_width_and_keyboard(browser, server):
    p = Page(browser, server, width=360, height=780).open()
    p.models_ready()
    pg = p.page
    # Every control has a label; buttons are buttons.
    unlabelled = pg.evaluate("""[...document.querySelectorAll('input, select, textarea')]
        .filter(e => e.getAttribute('aria-hidden') !== 'true' && e.type !== 'hidden' && !e.labels.length)
        .map(e => e.id)""")
    assert not unlabelled
    # From the keyboard: focus the prompt, type, Ctrl+Enter generates.
    pg.focus("#prompt")
    pg.keyboard.type("ROMEO:")
    pg.fill("#max_tokens", "60")
    pg.focus("#prompt")
    pg.keyboard.press("Control+Enter")
    assert p.wait_finished() in ("length", "stop")
    assert pg.evaluate("document.documentElement.scrollWidth") <= 360
    assert pg.evaluate("document.body.scrollWidth") <= 360
    p.shot("phone.png", full_page=True)
    p.close()


def test_store_load_and_unload(page, server, tmp_path):
    from quill.push import push

    pg = page.page
    expect(pg.locator("#admin")).to_be_visible()

    push(make_tiny_model(tmp_path / "pushed"), "pushed", server.url, ADMIN, quiet=True)
    pg.reload()
    stored = pg.locator("#model optgroup[label^=Stored] option[value=pushed]")
    expect(stored).to_have_count(1)
    expect(stored).to_contain_text(re.compile(r"\d+(\.\d+)? (KB|MB)"))  # its size
    pg.select_option("#model", "pushed")
    expect(pg.locator("#model-info")).to_contain_text("not loaded")
    pg.click("#admin summary")
    pg.click("#load")  # no admin key yet: the error is shown at the key field
    expect(pg.locator("#admin-key-error")).to_be_visible()
    pg.fill("#admin-key", ADMIN)
    pg.select_option("#dtype", "bfloat16")
    pg.click("#load")
    expect(pg.locator("#admin-status")).to_contain_text("Loaded pushed", timeout=60_000)
    loaded = pg.locator("#model optgroup[label=Loaded] option[value=pushed]")
    expect(loaded).to_contain_text("bf16")
    expect(pg.locator("#model")).to_have_value("pushed")
    page.fill(prompt="abc", max_tokens=6)
    page.generate()
    assert page.wait_finished() in ("length", "stop")
    assert pg.locator("#stat-model").text_content() == "pushed"
    page.shot("store.png")
    pg.click("#unload")
    expect(pg.locator("#admin-status")).to_contain_text("Unloaded pushed")
    expect(stored).to_have_count(1)
    expect(pg.locator("#alert")).to_be_hidden()
    assert pg.evaluate("sessionStorage.getItem('quill.adminKey')") == ADMIN


def test_without_store_routes_no_load_controls(browser, server):
    """A server without the model store (no load/unload routes, plain model cards): the admin panel stays hidden."""
    p = Page(browser, server)

    def plain_models(route):
        body = route.fetch().json()
        keep = ("id", "object", "created", "owned_by", "context_length", "vocab_size", "parameters", "has_chat_template")
        body["data"] = [{k: m[k] for k in keep if k in m} for m in body["data"] if m.get("loaded", True)]
        route.fulfill(json=body)

    p.page.route("**/openapi.json", lambda route: route.fulfill(json={"openapi": "3.1.0", "paths": {}}))
    p.page.route("**/v1/models", plain_models)
    p.open().models_ready()
    expect(p.page.locator("#admin")).to_be_hidden()
    assert p.page.locator("#model option").count() == 2
    p.close()


def test_admin_pulls_gpt2_from_the_hub_with_progress_then_generates(browser, tmp_path):
    """The Hub picker: an admin downloads `gpt2` from a loopback stand-in Hub (a tiny random GPT-2 with the
    real tokenizer under openai-community/gpt2), watches the progress bar, then generates with it."""
    import quill

    from conftest import ServerProcess
    from hubstub import HubStub

    tiny = make_tiny_model(tmp_path / "gpt2", tokenizer="gpt2", n_positions=64, n_embd=64)
    stub = HubStub({"openai-community/gpt2": tiny}, hold_once=("model.safetensors",))  # waits at 90%: the bar is seen
    env = {"HF_ENDPOINT": stub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DOWNLOAD_TIMEOUT": "300"}  # held: no timeout and retry
    server = ServerProcess([f"small={make_tiny_model(tmp_path / 'small')}", "--api-key", KEY, "--admin-key", ADMIN,
                            "--store", tmp_path / "store"], tmp_path / "server.log", env=env).wait_ready()
    try:
        p = Page(browser, server).open()
        p.models_ready()
        pg = p.page
        pg.click("#admin summary")
        expect(pg.locator("#hub-controls")).to_be_visible()
        pg.fill("#admin-key", ADMIN)
        pg.dispatch_event("#admin-key", "change")
        expect(pg.locator("#hub-model option")).to_have_count(6)
        expect(pg.locator("#hub-model option[value=gpt2-medium]")).to_contain_text("355M")
        pg.select_option("#hub-model", "gpt2")
        pg.evaluate("""() => {
            window.__progress = [];
            setInterval(() => { const b = document.getElementById('pull-progress');
                                if (!b.hidden) window.__progress.push(b.value / b.max); }, 100);
        }""")
        pg.click("#pull")
        expect(pg.locator("#pull-status")).to_contain_text(re.compile(r"Downloading gpt2 [1-9]"))  # under way
        expect(pg.locator("#pull-progress")).to_be_visible()
        # polled through evaluate, not wait_for_function: that one's polling evals the string in the page, which
        # the page's Content-Security-Policy (script-src 'self') refuses whenever the first check is false
        deadline = time.monotonic() + 60
        while not pg.evaluate("window.__progress.some(v => v > 0 && v < 1)"):
            assert time.monotonic() < deadline, "the progress bar never showed a fraction"
            pg.wait_for_timeout(100)
        p.shot("hub.png")
        stub.release()
        expect(pg.locator("#pull-status")).to_contain_text("Ready: gpt2", timeout=120_000)
        seen = pg.evaluate("window.__progress")
        assert any(0 < v < 1 for v in seen), f"no progress shown: {seen}"
        expect(pg.locator("#model")).to_have_value("gpt2")
        expect(pg.locator("#model optgroup[label=Loaded] option[value=gpt2]")).to_have_count(1)
        p.fill(prompt=PROMPT, max_tokens=8, temperature=0)
        p.generate()
        expect(pg.locator("#generate")).to_be_enabled(timeout=TIMEOUT)
        assert p.wait_finished() in ("length", "stop"), pg.locator("#alert-text").text_content()
        assert pg.locator("#stat-model").text_content() == "gpt2"
        assert p.output() == quill.load(tiny).generate(PROMPT, 8, temperature=0).text
        p.close()
    finally:
        server.stop()
        stub.stop()


def test_format_control_sends_its_field(page):
    pg = page.page
    page.fill(prompt=PROMPT, max_tokens=20)
    expect(pg.locator("#format-spec")).to_be_hidden()
    for kind, spec, sent in [
        ("choice", "yes\nno", {"structured_outputs": {"choice": ["yes", "no"]}}),
        ("regex", "[a-z]{3}!", {"structured_outputs": {"regex": "[a-z]{3}!"}}),
        ("json_schema", '{"type": "boolean"}', {"response_format": {"type": "json_schema", "json_schema": {
            "name": "schema", "schema": {"type": "boolean"}}}}),
    ]:
        pg.select_option("#format", kind)
        pg.fill("#format-spec", spec)
        with pg.expect_request("**/v1/*completions") as request:
            page.generate()
        body = request.value.post_data_json
        assert {k: body[k] for k in sent} == sent
        expect(pg.locator("#stat-finish")).to_have_attribute("data-reason", "stop", timeout=TIMEOUT)
        text = page.output()
        assert (text in ("yes", "no") if kind == "choice" else re.fullmatch("[a-z]{3}!", text) if kind == "regex"
                else text in ("true", "false")), text
    pg.fill("#format-spec", "{not json")  # checked before sending, at the control
    page.generate()
    expect(pg.locator("#format-error")).to_contain_text("not valid JSON")
    pg.select_option("#format", "none")
    expect(pg.locator("#format-spec")).to_be_hidden()
    with pg.expect_request("**/v1/*completions") as request:
        page.generate()
    assert not {"response_format", "structured_outputs"} & set(request.value.post_data_json)
    expect(pg.locator("#stat-finish")).to_have_attribute("data-reason", re.compile("stop|length"), timeout=TIMEOUT)
    page.shot("format.png")
