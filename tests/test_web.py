"""The chat page (GET /, phi3/web/chat.html) in a real browser against a live `phi3 serve` with search.

Drives Debian's chromium (/usr/bin/chromium) with Playwright; the module skips when either is missing.
The page's Content-Security-Policy forbids eval, so the test waits with Playwright's `expect`
(selector engine) and `page.evaluate` (DevTools protocol), never with `wait_for_function` (eval).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest

from conftest import SEARCH_FACT, SEARCH_QUESTION

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); the chat page test needs a browser",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
expect = sync_api.expect

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
STORY = "Write a long story about a dragon who learns to bake bread."

# Collects Content-Security-Policy violations (the page must work under its own CSP).
WATCH_CSP = """
window.__csp = [];
document.addEventListener("securitypolicyviolation", (e) => window.__csp.push(e.violatedDirective + " " + e.blockedURI));
"""

# Records the length of the streaming answer at every DOM change, to see it grow piece by piece.
WATCH_GROWTH = """() => {
  window.__growth = [];
  new MutationObserver(() => {
    if (document.body.dataset.state !== "streaming") return;
    const answers = document.querySelectorAll(".msg.assistant .content");
    if (answers.length) window.__growth.push(answers[answers.length - 1].textContent.length);
  }).observe(document.getElementById("messages"), {childList: true, subtree: true, characterData: true});
}"""


class Chat:
    """The page plus what it sent: every POST /v1/chat/completions body, JS errors."""

    def __init__(self, page, url: str) -> None:
        self.page, self.url = page, url
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []  # the Authorization header of each of those requests
        self.errors: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("request", self._request)
        page.add_init_script(WATCH_CSP)
        page.goto(url + "/")

    def _request(self, request) -> None:
        if request.method == "POST" and request.url.endswith("/v1/chat/completions"):
            self.bodies.append(request.post_data_json)
            self.auth.append(request.headers.get("authorization"))

    def settings(self, **fields: str) -> None:
        self.page.evaluate("document.getElementById('settings').open = true")
        for name, value in fields.items():
            self.page.fill("#" + name.replace("_", "-"), value)
        self.page.evaluate("document.getElementById('settings').open = false")

    def ask(self, text: str, timeout_ms: int = 30_000):
        """Send `text` with Enter; return the new answer element once the page is idle again."""
        answers = self.page.locator(".msg.assistant")
        before = answers.count()
        self.page.fill("#message", text)
        self.page.press("#message", "Enter")
        expect(answers).to_have_count(before + 1)
        expect(self.page.locator("body")).to_have_attribute("data-state", "idle", timeout=timeout_ms)
        return answers.last

    def check_clean(self) -> None:
        assert self.errors == [], f"JavaScript errors: {self.errors}"
        assert self.page.evaluate("window.__csp") == [], "the page broke its own Content-Security-Policy"


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def chat(browser, search_server):
    context = browser.new_context()  # fresh localStorage per test
    try:
        yield Chat(context.new_page(), search_server.url)
    finally:
        context.close()


def test_chat_streams_searches_and_keeps_conversations(chat, search_server):
    page = chat.page
    health = httpx.get(search_server.url + "/health", timeout=10).json()
    assert health["search"] is True
    expect(page.locator("#model-name")).to_have_text(health["model"])
    expect(page.locator("#context-size")).to_contain_text(str(health["context_length"]))
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(page.locator("#temperature")).to_have_value("0.7")
    expect(page.locator("#max-tokens")).to_have_value("512")
    toggle = page.locator("#search-toggle")
    expect(toggle).to_be_enabled()

    chat.settings(temperature="0", max_tokens="64")
    toggle.uncheck()
    page.evaluate(WATCH_GROWTH)
    answer = chat.ask("What is the capital of France?")
    text = answer.locator(".content").text_content()
    assert text.strip(), "empty answer"
    body = chat.bodies[-1]
    assert body["model"] == health["model"] and body["stream"] is True
    assert body["search"] is False and body["temperature"] == 0 and body["max_tokens"] == 64
    assert body["messages"] == [{"role": "user", "content": "What is the capital of France?"}]
    growth = page.evaluate("window.__growth")
    assert len({n for n in growth if n > 0}) >= 2 and max(growth) <= len(text), \
        f"the answer did not stream in pieces: lengths seen {growth}"
    assert answer.locator(".sources").count() == 0
    assert answer.locator(".error").count() == 0

    toggle.check()
    answer = chat.ask(SEARCH_QUESTION)
    assert SEARCH_FACT in answer.locator(".content").text_content()
    body = chat.bodies[-1]
    assert body["search"] is True
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]  # the history goes along
    links = answer.locator(".sources a")
    assert links.count() >= 1
    found = [(links.nth(i).text_content(), links.nth(i).get_attribute("href")) for i in range(links.count())]
    assert any("vexaria" in f"{t} {h}".lower() for t, h in found), found
    assert found[0][0].startswith("[1] ")

    conversations = page.locator("#conversations")
    expect(conversations).to_contain_text("What is the capital of France?")

    page.reload()  # conversations live in localStorage
    expect(conversations).to_contain_text("What is the capital of France?")
    answers = page.locator(".msg.assistant")
    expect(answers).to_have_count(2)
    expect(answers.last.locator(".content")).to_contain_text(SEARCH_FACT)
    expect(answers.last.locator(".sources a").first).to_have_text(re.compile(r"^\[1\] "))
    expect(page.locator("#temperature")).to_have_value("0")  # settings survive too

    page.click("#new-chat")
    expect(page.locator(".msg")).to_have_count(0)
    expect(page.locator("#message")).to_be_focused()
    chat.check_clean()


def test_stop_errors_and_api_key(chat, search_server):
    page = chat.page
    expect(page.locator("#model-name")).not_to_have_text("…")
    chat.settings(temperature="0", max_tokens="400")
    page.locator("#search-toggle").uncheck()
    page.fill("#message", STORY)
    page.click("#send")
    answer = page.locator(".msg.assistant").last
    expect(page.locator("body")).to_have_attribute("data-state", "streaming")
    expect(answer.locator(".content")).to_have_text(re.compile(r"\S"), timeout=20_000)  # first text is in

    start = time.monotonic()
    page.click("#stop")
    expect(page.locator("body")).to_have_attribute("data-state", "idle", timeout=3_000)
    took = time.monotonic() - start
    stopped = answer.locator(".content").text_content()
    expect(answer.locator(".meta")).to_contain_text("stopped")
    assert answer.locator(".error").count() == 0
    page.wait_for_timeout(300)
    assert answer.locator(".content").text_content() == stopped, "text kept arriving after Stop"

    # The server noticed the disconnect and dropped the request.
    deadline = time.monotonic() + 5
    while (counts := httpx.get(search_server.url + "/health", timeout=10).json())["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert counts["running"] == 0 and counts["waiting"] == 0, counts

    # At temperature 0 the stopped answer is the start of the full one, and much shorter.
    # A hang guard only: 400 tokens take ~4 s on an idle 2-core machine, over 60 s when another
    # process keeps a core busy (2 PyTorch threads on 1 free core wait on each other).
    full = httpx.post(search_server.url + "/v1/chat/completions", timeout=300, json={
        "model": chat.bodies[-1]["model"], "messages": [{"role": "user", "content": STORY}],
        "temperature": 0, "max_tokens": 400, "search": False}).json()["choices"][0]["message"]["content"]
    assert full.startswith(stopped), (stopped, full[:200])
    assert len(stopped) < len(full) / 2, (len(stopped), len(full))
    print(f"stop took {took:.2f} s; kept {len(stopped)} of {len(full)} characters")
    expect(page.locator("#regenerate")).to_be_enabled()

    # Errors, from a stand-in for the server: a JSON error status, an error inside the stream, a 401.
    replies = []
    page.route("**/v1/chat/completions", lambda route: replies.pop(0)(route))

    def error(status: int, message: str):
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
        return lambda route: route.fulfill(status=status, content_type="application/json", body=json.dumps(body))

    replies.append(error(400, "max_tokens is too large"))
    answer = chat.ask("first")
    expect(answer.locator(".error")).to_contain_text("Error 400: max_tokens is too large")

    events = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
              {"choices": [{"index": 0, "delta": {"content": "Half <b>an</b>"}}]},
              {"error": {"message": "the engine failed", "type": "server_error"}}]
    sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    replies.append(lambda route: route.fulfill(status=200, content_type="text/event-stream", body=sse))
    answer = chat.ask("second")
    expect(answer.locator(".content")).to_have_text("Half <b>an</b>")  # text, not markup
    assert answer.locator(".content b").count() == 0
    expect(answer.locator(".error")).to_contain_text("the engine failed")

    replies.append(error(401, "missing or wrong API key"))
    answer = chat.ask("third")
    expect(answer.locator(".error")).to_contain_text("401")
    expect(page.locator("#settings")).to_have_attribute("open", "")
    expect(page.locator("#api-key")).to_be_focused()
    page.fill("#api-key", "KEY123")
    page.press("#api-key", "Enter")
    expect(page.locator("#key-status")).to_contain_text("accepted")
    page.unroute("**/v1/chat/completions")

    chat.settings(max_tokens="16")
    page.click("#regenerate")  # the real server again: answers "third", replacing the failed answer
    expect(page.locator("body")).to_have_attribute("data-state", "idle", timeout=30_000)
    answer = page.locator(".msg.assistant").last
    expect(answer.locator(".content")).to_have_text(re.compile(r"\S"))
    assert answer.locator(".error").count() == 0
    expect(page.locator(".msg.assistant")).to_have_count(4)
    assert chat.auth[-1] == "Bearer KEY123" and chat.auth[0] is None
    assert chat.bodies[-1]["messages"][-1] == {"role": "user", "content": "third"}
    assert page.evaluate("localStorage.getItem('phi3.apiKey')") == json.dumps("KEY123")
    chat.check_clean()


API_KEY = "right-key-123"


@pytest.fixture(scope="module")
def key_server(smollm_gguf, tmp_path_factory):
    """The default model behind `--api-key`: every request but GET / needs the key."""
    from conftest import LiveServer
    s = LiveServer("--model", str(smollm_gguf), "--api-key", API_KEY, "--threads", "1",
                   log=tmp_path_factory.mktemp("serve") / "log")
    yield s
    s.close()


def test_a_wrong_saved_key_is_reported_and_another_can_be_entered(browser, key_server):
    """Issue 14 item 7: a wrong key in localStorage left the settings at "Checking…" with the
    JavaScript error `err is not defined`. Now the page says the key was refused, opens the key
    field, and a right key entered there works."""
    context = browser.new_context()
    try:
        chat = Chat(context.new_page(), key_server.url)
        page = chat.page
        status = page.locator("#key-status")
        expect(status).to_contain_text("This server needs an API key.")  # no key saved yet
        page.evaluate(f"localStorage.setItem('phi3.apiKey', {json.dumps(json.dumps('wrong-key'))})")
        page.reload()
        expect(status).to_contain_text("The server refused the saved API key (401).")
        expect(status).to_have_class(re.compile(r"\bwarn\b"))
        expect(page.locator("#model-name")).to_have_text("(API key needed)")
        expect(page.locator("#settings")).to_have_attribute("open", "")
        expect(page.locator("#api-key")).to_be_focused()
        expect(page.locator("#api-key")).to_have_value("wrong-key")
        assert chat.errors == [], f"JavaScript errors: {chat.errors}"

        page.fill("#api-key", "still-wrong")  # saving another wrong key: refused again, not "Checking…"
        page.press("#api-key", "Enter")
        expect(status).to_contain_text("The server refused the saved API key (401).")
        expect(status).not_to_contain_text("Checking")

        page.fill("#api-key", API_KEY)
        page.press("#api-key", "Enter")
        expect(status).to_contain_text("Key accepted and saved in this browser.")
        health = httpx.get(key_server.url + "/health", headers={"Authorization": "Bearer " + API_KEY}, timeout=10).json()
        expect(page.locator("#model-name")).to_have_text(health["model"])
        assert page.evaluate("localStorage.getItem('phi3.apiKey')") == json.dumps(API_KEY)
        chat.settings(temperature="0", max_tokens="4")
        answer = chat.ask("Hi")
        assert answer.locator(".error").count() == 0 and chat.auth[-1] == "Bearer " + API_KEY
        chat.check_clean()
    finally:
        context.close()
