"""`phi3 serve` driven by the official openai client on the real SmolLM2-135M-Instruct: chat and
completions (streamed and not) equal `phi3 generate`; 16 concurrent streams each equal the text
they get alone; every bad request gets a 4xx that says what to fix and the server keeps serving;
API keys, the bounded queue, disconnects; search-augmented answers with sources."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from tests.conftest import SEARCH_FACT, SEARCH_QUESTION, LiveServer, run_cli

MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def client(server, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def chat_text(server, messages, max_tokens=32, **kw) -> str:
    r = client(server).chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                                max_tokens=max_tokens, **kw)
    return r.choices[0].message.content


def generate_cli(smollm_gguf, prompt: str, max_tokens: int, raw: bool = False) -> dict:
    r = run_cli("generate", "--model", str(smollm_gguf), "--prompt", prompt, "--max-tokens", str(max_tokens),
                "--json", *(["--raw"] if raw else []))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_models_and_health(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "phi3"
    assert models.data[0].model_extra["context_length"] == 8192
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["model"] == MODEL and h["search"] is False
    assert client(server).models.retrieve(MODEL).id == MODEL


def test_chat_equals_phi3_generate_streamed_and_not(server, smollm_gguf):
    expect = generate_cli(smollm_gguf, FRANCE[0]["content"], 40)
    c = client(server)
    r = c.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=40)
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expect["text"]
    assert r.choices[0].finish_reason == expect["finish_reason"]
    assert r.usage.prompt_tokens == expect["prompt_tokens"]
    assert r.usage.completion_tokens == len(expect["token_ids"])
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(c.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=40,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    assert len([p for p in pieces if p]) > 2  # streamed, not one lump
    assert "".join(pieces) == expect["text"]
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == expect["finish_reason"]
    assert chunks[-1].usage.completion_tokens == len(expect["token_ids"])


def test_system_and_assistant_turns_and_stop(server):
    messages = [{"role": "system", "content": "You are a poet."},
                {"role": "user", "content": "Say hello."},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Write a haiku about the sea."}]
    full = chat_text(server, messages, max_tokens=48)
    assert full != chat_text(server, messages[-1:], max_tokens=48)  # the earlier turns count
    word = full.split()[3]
    stopped = client(server).chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=48,
                                                      stop=[word, "zzz"])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == full[:full.index(word)]
    # content given as a list of text parts
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                          {"type": "text", "text": "of France?"}]}]
    assert chat_text(server, parts) == chat_text(server, FRANCE)


def test_seeded_sampling_repeats(server):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Write a poem about rain."}], temperature=1.0,
              top_p=0.95, max_tokens=24, seed=7)
    a = client(server).chat.completions.create(**kw).choices[0].message.content
    b = client(server).chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_completions_equal_phi3_generate_raw(server, smollm_gguf):
    prompt = "The three primary colors are"
    expect = generate_cli(smollm_gguf, prompt, 20, raw=True)
    c = client(server)
    r = c.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=20)
    assert r.object == "text_completion"
    assert r.choices[0].text == expect["text"]
    assert r.usage.prompt_tokens == expect["prompt_tokens"]
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=20, stream=True) if ch.choices)
    assert streamed == expect["text"]
    default = c.completions.create(model=MODEL, prompt=prompt, temperature=0)
    assert default.usage.completion_tokens <= 16  # OpenAI's default max_tokens for completions


def test_sixteen_concurrent_streams_each_equal_their_text_alone(server):
    prompts = [f"Write one sentence about the number {i}." for i in range(16)]
    alone = [chat_text(server, [{"role": "user", "content": p}], max_tokens=32) for p in prompts]
    got: dict[int, str] = {}
    started = threading.Barrier(16)

    def run(i: int) -> None:
        started.wait()
        s = client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompts[i]}],
                                                    temperature=0, max_tokens=32, stream=True)
        got[i] = "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(got) == list(range(16))
    for i in range(16):
        assert got[i] == alone[i], prompts[i]


BAD_REQUESTS = [
    # (description, body bytes or JSON, status, words the message must contain)
    ("malformed JSON", b'{"model": "x", "messages": [', 400, "not valid JSON"),
    ("not an object", b'[1, 2]', 400, "JSON object"),
    ("unknown model", {"model": "gpt-5", "messages": FRANCE}, 404, "does not exist"),
    ("missing messages", {"model": MODEL}, 400, "missing required field 'messages'"),
    ("messages not a list", {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("empty messages", {"model": MODEL, "messages": []}, 400, "messages is empty"),
    ("bad role", {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400, "role must be"),
    ("temperature as text", {"model": MODEL, "messages": FRANCE, "temperature": "hot"}, 400, "temperature"),
    ("temperature out of range", {"model": MODEL, "messages": FRANCE, "temperature": 5}, 400, "temperature"),
    ("max_tokens as text", {"model": MODEL, "messages": FRANCE, "max_tokens": "ten"}, 400, "max_tokens"),
    ("max_tokens zero", {"model": MODEL, "messages": FRANCE, "max_tokens": 0}, 400, "max_tokens"),
    ("over the context", {"model": MODEL, "messages": FRANCE, "max_tokens": 9000}, 400, "context of 8192"),
    ("n=2", {"model": MODEL, "messages": FRANCE, "n": 2}, 400, "n=1"),
    ("five stop strings", {"model": MODEL, "messages": FRANCE, "stop": list("abcde")}, 400, "at most 4"),
    ("search without an index", {"model": MODEL, "messages": FRANCE, "search": True}, 400, "phi3 serve --search"),
    ("oversized body", {"model": MODEL, "messages": [{"role": "user", "content": "x" * (5 << 20)}]}, 413,
     "over the limit"),
    # issue 14 item 8: these were plain-text 500s
    ("JSON nested 5000 deep", b'{"model": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "nested more than 64 levels"),
    ("JSON nested 100 deep", {"model": MODEL, "messages": FRANCE, "x": json.loads("[" * 100 + "]" * 100)}, 400,
     "nested more than 64 levels"),
    ("lone surrogate in model", b'{"model": "x\\ud800", "messages": []}', 400, "model: holds a lone UTF-16 surrogate"),
    ("lone surrogate in a message", b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", '
     b'"content": "hi \\udc80"}]}', 400, "messages.0.content: holds a lone UTF-16 surrogate"),
    ("seed over int64", {"model": MODEL, "messages": FRANCE, "seed": 2 ** 64}, 400, "seed"),
    ("seed over int64, streamed", {"model": MODEL, "messages": FRANCE, "seed": 2 ** 63, "stream": True}, 400, "seed"),
    ("seed under int64", {"model": MODEL, "messages": FRANCE, "seed": -2 ** 63 - 1}, 400, "seed"),
    # issue 14 item 13: unsupported OpenAI features are named, not ignored
    ("top_logprobs without logprobs", {"model": MODEL, "messages": FRANCE, "top_logprobs": 3}, 400,
     "top_logprobs needs logprobs: true"),
    ("top_logprobs over 20", {"model": MODEL, "messages": FRANCE, "logprobs": True, "top_logprobs": 21}, 400,
     "top_logprobs"),
    ("logprobs as text", {"model": MODEL, "messages": FRANCE, "logprobs": "yes"}, 400, "logprobs"),
    ("continue a user message", {"model": MODEL, "messages": FRANCE, "continue_final_message": True,
                                 "add_generation_prompt": False}, 400, "continue_final_message needs a last message"),
    ("continue and a generation prompt", {"model": MODEL, "messages": FRANCE + [{"role": "assistant", "content": "P"}],
                                          "continue_final_message": True, "add_generation_prompt": True}, 400,
     "cannot both be true"),
    ("tools", {"model": MODEL, "messages": FRANCE, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "tools is not supported"),
    ("tool_choice", {"model": MODEL, "messages": FRANCE, "tool_choice": "required"}, 400, "tool_choice is not supported"),
    ("response_format", {"model": MODEL, "messages": FRANCE, "response_format": {"type": "json_object"}}, 400,
     'response_format "json_object" is not supported'),
    ("image part", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, 400,
     "messages.0.content.1: 'image_url' content parts are not supported"),
    ("audio part", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]}, 400, "'input_audio' content parts"),
    ("audio output", {"model": MODEL, "messages": FRANCE, "modalities": ["text", "audio"]}, 400,
     "modalities is not supported"),
    ("too long by characters", {"model": MODEL, "messages": [{"role": "user", "content": "x" * (8192 * 81 + 1)}]}, 400,
     "the messages hold 663553 characters, more than the model's context of 8192 tokens can take"),
]


@pytest.mark.parametrize("name,body,status,words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_chat_requests_get_a_4xx_that_says_what_to_fix(server, name, body, status, words):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/chat/completions", content=data, headers={"Content-Type": "application/json"},
                   timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"], err
    assert set(err) == {"message", "type", "param", "code"}


def test_accepted_forms_of_optional_openai_fields(server):
    """What stays accepted: the 'off' values of the refused features, and seeds at the int64 ends."""
    for extra in ({"logprobs": False}, {"top_logprobs": 0}, {"tools": []}, {"tool_choice": "none"},
                  {"response_format": {"type": "text"}}, {"seed": 2 ** 63 - 1}, {"seed": -2 ** 63}):
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": FRANCE, "max_tokens": 2,
                                                                  **extra}, timeout=60)
        assert r.status_code == 200, (extra, r.text)
    post = lambda body: httpx.post(server.url + "/v1/completions", timeout=60, json={  # noqa: E731
        "model": MODEL, "prompt": "Hi", "max_tokens": 2, **body})
    assert post({"logprobs": None, "best_of": 1, "suffix": ""}).status_code == 200
    for body, words in (({"logprobs": 21}, "logprobs"), ({"best_of": 2}, "best_of is not supported"),
                        ({"suffix": "end"}, "suffix is not supported")):
        r = post(body)
        assert r.status_code == 400 and words in r.json()["error"]["message"], (body, r.text)
    r = httpx.post(server.url + "/v1/completions", content=b'{"model": "' + MODEL.encode() + b'", "prompt": "a\\ud800"}',
                   headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400 and "prompt: holds a lone UTF-16 surrogate" in r.json()["error"]["message"], r.text


def test_bad_completion_requests_and_routes(server):
    post = lambda body: httpx.post(server.url + "/v1/completions", json=body, timeout=60)  # noqa: E731
    cases = [({"model": MODEL, "prompt": ""}, 400, "prompt is empty"),
             ({"model": MODEL, "prompt": ["a", "b"]}, 400, "one prompt per request"),
             ({"model": MODEL, "prompt": [1, 999999]}, 400, "outside the vocabulary"),
             ({"model": MODEL, "prompt": "hi", "echo": True}, 400, "echo is not supported"),
             ({"model": MODEL, "prompt": 5}, 400, "prompt")]
    for body, status, words in cases:
        r = post(body)
        assert r.status_code == status and words in r.json()["error"]["message"], (body, r.text)
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "no route" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/chat/completions")
    assert r.status_code == 405
    # the openai client surfaces these as typed errors
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="gpt-5", messages=FRANCE)
    with pytest.raises(openai.BadRequestError, match="context"):
        client(server).chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=10 ** 6)


def test_server_still_serves_correctly_after_bad_requests(server, smollm_gguf):
    # runs after the bad-request tests (pytest keeps file order)
    expect = generate_cli(smollm_gguf, FRANCE[0]["content"], 40)
    assert chat_text(server, FRANCE, max_tokens=40) == expect["text"]
    assert httpx.get(server.url + "/health").json()["running"] == 0


@pytest.fixture(scope="module")
def small_server(smollm_gguf, tmp_path_factory):
    """One request at a time, one waiting, and an API key (from a file: on the command line it
    would show in `ps`)."""
    folder = tmp_path_factory.mktemp("serve")
    (folder / "key").write_text("sekrit\n")
    s = LiveServer("--model", str(smollm_gguf), "--max-batch", "1", "--max-queue", "1",
                   "--api-key-file", str(folder / "key"), log=folder / "log")
    yield s
    s.close()


def test_api_key(small_server):
    url = small_server.url
    assert httpx.get(url + "/v1/models").status_code == 401
    r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": FRANCE}).status_code == 401
    assert httpx.get(url + "/health").status_code == 401
    assert httpx.get(url + "/").status_code == 200  # the page asks for the key itself
    assert httpx.head(url + "/").status_code == 200  # HEAD / as GET / (it was a 401)
    for header in ("bearer sekrit", "BEARER sekrit", "Bearer  sekrit"):  # the scheme is case-insensitive
        assert httpx.get(url + "/v1/models", headers={"Authorization": header}).status_code == 200, header
    for header in ("Basic sekrit", "sekrit", "Bearer sekrit2", "Bearer"):
        assert httpx.get(url + "/v1/models", headers={"Authorization": header}).status_code == 401, header
    # with a key the Host header is not checked (the key is the guard), and the page may not be framed
    r = httpx.get(url + "/", headers={"Host": "my-proxy.example"})
    assert r.status_code == 200 and r.headers["x-frame-options"] == "DENY"
    with pytest.raises(openai.AuthenticationError):
        client(small_server, "wrong").models.list()
    assert client(small_server, "sekrit").models.list().data[0].id == MODEL


def _long_stream(server, key: str):
    c = client(server, key)
    return c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a very long story."}],
                                     temperature=0, max_tokens=3000, stream=True)


def _health(server, key: str) -> dict:
    return httpx.get(server.url + "/health", headers={"Authorization": f"Bearer {key}"}).json()


def test_full_queue_gets_429_and_a_disconnect_stops_generation(small_server):
    key = "sekrit"
    running = _long_stream(small_server, key)
    next(iter(running))  # generating now
    waiting_result: dict = {}
    waiter = threading.Thread(target=lambda: waiting_result.update(
        text=chat_text_with_key(small_server, key)))
    waiter.start()
    deadline = time.monotonic() + 30
    while _health(small_server, key)["waiting"] != 1:
        assert time.monotonic() < deadline, "second request never queued"
        time.sleep(0.05)
    with pytest.raises(openai.RateLimitError, match="max queue 1"):
        client(small_server, key).chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=4)
    running.close()  # the client goes away: its generation must stop, freeing the slot
    waiter.join(timeout=60)
    assert waiting_result["text"]
    deadline = time.monotonic() + 10
    while _health(small_server, key)["running"] != 0:
        assert time.monotonic() < deadline, "generation went on after the client left"
        time.sleep(0.05)


def chat_text_with_key(server, key: str) -> str:
    r = client(server, key).chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=8)
    return r.choices[0].message.content


def test_search_answers_with_the_fact_and_cites_its_document(search_server):
    c = client(search_server)
    ask = [{"role": "user", "content": SEARCH_QUESTION}]
    r = c.chat.completions.create(model=MODEL, messages=ask, temperature=0, max_tokens=40)
    assert SEARCH_FACT in r.choices[0].message.content
    sources = r.model_extra["sources"]
    assert sources[0]["source"] == "vexaria.md" and sources[0]["index"] == 1
    # the server's own link, never file:///the/server's/folder (issue 14 item 12)
    assert sources[0]["url"] == sources[0]["link"] == "/sources/vexaria.md"
    assert all("file:" not in s["url"] and "/tmp" not in json.dumps(s) for s in sources)
    assert sources[0]["title"] == "Vexaria"
    doc = httpx.get(search_server.url + sources[0]["link"])  # the page's link to the document
    assert doc.status_code == 200 and "Lumora" in doc.text and doc.headers["content-type"].startswith("text/plain")
    assert httpx.get(search_server.url + "/sources/..%2F..%2Fetc%2Fpasswd").status_code == 404
    assert httpx.get(search_server.url + "/sources/nothing.md").status_code == 404
    nul = httpx.get(search_server.url + "/sources/a%00b.md")  # a NUL byte: was a plain-text 500
    assert nul.status_code == 404 and nul.json()["error"]["code"] == "not_found"

    off = c.chat.completions.create(model=MODEL, messages=ask, temperature=0, max_tokens=40,
                                    extra_body={"search": False})
    assert "sources" not in (off.model_extra or {})
    assert SEARCH_FACT not in off.choices[0].message.content

    chunks = list(c.chat.completions.create(model=MODEL, messages=ask, temperature=0, max_tokens=40, stream=True))
    assert chunks[0].model_extra["sources"] == sources
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == r.choices[0].message.content
    assert httpx.get(search_server.url + "/health").json()["search"] is True


def test_index_and_chat_search_commands(search_index, smollm_gguf, tmp_path):
    r = run_cli("index", "search", str(search_index), SEARCH_QUESTION, "-k", "2", "--json")
    assert r.returncode == 0, r.stderr
    hits = json.loads(r.stdout)
    assert hits[0]["source"] == "vexaria.md" and len(hits) == 2
    r = run_cli("chat", "--model", str(smollm_gguf), "--search", str(search_index), "--max-tokens", "40",
                stdin=SEARCH_QUESTION + "\n")
    assert r.returncode == 0, r.stderr
    assert SEARCH_FACT in r.stdout and "[1] Vexaria <file://" in r.stdout
    for args, words in [(("index", "build", str(tmp_path / "nope"), "--index", str(tmp_path / "i")), "nope"),
                        (("index", "search", str(tmp_path), "x"), "index"),
                        (("serve", "--port", "0"), "--port 0"),
                        (("serve", "--search", str(tmp_path / "missing")), "missing")]:
        r = run_cli(*args, timeout=60)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# --- in-process servers: the engine and tokenizer can be watched, the connection limits made small --------

import socket  # noqa: E402

from phi3.engine import Engine  # noqa: E402
from phi3.server import Limits, create_app, make_server  # noqa: E402
from tests.conftest import _free_port  # noqa: E402

STORY = [{"role": "user", "content": "Tell me a very long story."}]


class InProcess:
    """create_app + make_server on a free loopback port, uvicorn in a thread and the engine in
    another; `requests` records what reached the engine and every event each one got, with
    whether it had been cancelled by then."""

    def __init__(self, lm, limits: Limits = Limits(), max_batch: int = 16, max_queue: int = 16, **app_kw) -> None:
        self.engine = Engine(lm.model, lm.tokenizer, max_batch=max_batch, max_queue=max_queue).start()
        self.requests: list = []
        self.events: dict[int, list] = {}
        submit = self.engine.submit

        def spy(request) -> None:
            log = self.events.setdefault(id(request), [])
            on_event = request.on_event
            request.on_event = lambda kind, value: (log.append((kind, value, request.cancelled.is_set())),
                                                    on_event(kind, value))
            submit(request)
            self.requests.append(request)
        self.engine.submit = spy
        self.app = create_app(self.engine, MODEL, body_timeout=limits.body_timeout, **app_kw)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(self.app, "127.0.0.1", self.port, limits)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the in-process server did not start"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.stop()

    def wait(self, condition, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, what
            time.sleep(0.02)


def _raw(port: int, data: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(60)
    s.sendall(data)
    return s


def _post_bytes(path: str, body: dict, host: str = "127.0.0.1") -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def _read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


@pytest.fixture(scope="module")
def smollm(smollm_gguf):
    from phi3.checkpoint import load
    return load(smollm_gguf)


@pytest.fixture(scope="module")
def inproc(smollm):
    s = InProcess(smollm, max_batch=2, max_queue=2)
    yield s
    s.close()


def test_clients_that_leave_non_streamed_requests_stop_them_within_one_step(inproc):
    """Issue 14 item 3: four non-streamed requests on a --max-batch 2 server, all abandoned: each
    stops with at most one more token after its client went (two were decoding, two waiting),
    instead of generating 2000 tokens each while new clients wait."""
    body = {"model": MODEL, "messages": STORY, "temperature": 0, "max_tokens": 2000}
    before = len(inproc.requests)
    clients = [_raw(inproc.port, _post_bytes("/v1/chat/completions", body)) for _ in range(4)]
    mine = lambda: inproc.requests[before:]  # noqa: E731
    inproc.wait(lambda: len(mine()) == 4 and sum(any(k == "text" for k, _, _ in inproc.events[id(r)])
                                                 for r in mine()) == 2, "two requests never started decoding")
    assert httpx.get(inproc.url + "/health").json() | {} == {
        "status": "ok", "model": MODEL, "context_length": 8192, "search": False, "running": 2, "waiting": 2}
    for c in clients:
        c.close()
    inproc.wait(lambda: all(inproc.events[id(r)] and inproc.events[id(r)][-1][0] == "done" for r in mine()),
                "abandoned requests did not finish")
    for r in mine():
        log = inproc.events[id(r)]
        assert r.cancelled.is_set()
        after = [k for k, _, cancelled in log if cancelled and k == "text"]
        assert len(after) <= 1, f"{len(after)} tokens were released after the client left"
        assert len(log[-1][1].token_ids) < 2000
    # A waiting request may still be admitted when a slot frees before its own client's
    # disconnect is seen (the four sockets close one after another); it then stops within one
    # step like the others (checked above). Seen in a CI run: 3 started.
    started = [r for r in mine() if any(k == "text" for k, _, _ in inproc.events[id(r)])]
    assert 2 <= len(started) <= 4
    assert chat_text(inproc, FRANCE, max_tokens=8)  # a new client is served at once
    inproc.wait(lambda: engine_idle(inproc), "the engine kept busy")


def engine_idle(s) -> bool:
    return httpx.get(s.url + "/health").json()["running"] == 0 and httpx.get(s.url + "/health").json()["waiting"] == 0


def test_a_huge_prompt_is_refused_by_length_before_tokenizing_and_tokenizing_is_off_the_event_loop(
        inproc, smollm, monkeypatch):
    """Issue 14 item 4: a 4 MB prompt was tokenized in the request handler, freezing /health and
    every stream for seconds, and then refused anyway."""
    calls: list[str] = []
    for name in ("encode", "encode_chat"):
        real = getattr(smollm.tokenizer, name)
        monkeypatch.setattr(smollm.tokenizer, name, lambda *a, real=real, name=name, **k: (
            calls.append(f"{name} in {threading.current_thread().name}"), real(*a, **k))[1])
    huge = "word " * 800_000  # 4 MB
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": huge}]}),
                       ("/v1/completions", {"prompt": huge})):
        r = httpx.post(inproc.url + path, json={"model": MODEL, **body}, timeout=60)
        assert r.status_code == 400 and "4000000 characters" in r.json()["error"]["message"], r.text
        assert r.json()["error"]["code"] == "context_length_exceeded"
    assert calls == []  # refused by its length: never tokenized
    assert chat_text(inproc, FRANCE, max_tokens=2)
    assert client(inproc).completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices
    assert {c.split()[0] for c in calls} == {"encode", "encode_chat"}
    assert not any(c.endswith(f" in {inproc.thread.name}") for c in calls), calls  # a worker thread, not the loop's


def test_post_needs_json_content_type_and_host_must_name_this_server(inproc):
    """Issue 14 item 11: a text/plain POST (what a page on another origin may send without asking)
    started a generation; without a key any Host was served (DNS rebinding); the page could be framed."""
    body = json.dumps({"model": MODEL, "messages": FRANCE, "max_tokens": 2})
    before = len(inproc.requests)
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        r = httpx.post(inproc.url + "/v1/chat/completions", content=body,
                       headers={"Content-Type": kind} if kind else {})
        assert r.status_code == 415 and "Content-Type must be application/json" in r.json()["error"]["message"], kind
    assert len(inproc.requests) == before  # nothing reached the engine
    ok = httpx.post(inproc.url + "/v1/chat/completions", content=body,
                    headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200
    for host in ("evil.example", f"evil.example:{inproc.port}", "127.0.0.1.nip.io", "localhost.evil.example"):
        r = httpx.get(inproc.url + "/health", headers={"Host": host})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", host
        assert httpx.get(inproc.url + "/", headers={"Host": host}).status_code == 400
    for host in ("127.0.0.1", f"127.0.0.1:{inproc.port}", f"localhost:{inproc.port}", "LOCALHOST", "[::1]:8000",
                 "192.168.1.20:8000"):  # an IP address cannot be rebound
        assert httpx.get(inproc.url + "/health", headers={"Host": host}).status_code == 200, host
    for path in ("/", "/health", "/v1/nothing"):
        r = httpx.get(inproc.url + path)
        assert r.headers["content-security-policy"] == "frame-ancestors 'none'", path
        assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"


def test_allowed_host_names(smollm):
    s = InProcess(smollm, host="0.0.0.0", allowed_hosts=["chat.example.org"])
    try:
        assert httpx.get(s.url + "/health", headers={"Host": "chat.example.org:443"}).status_code == 200
        assert httpx.get(s.url + "/health", headers={"Host": "other.example.org"}).status_code == 400
    finally:
        s.close()


def test_sources_serves_only_indexed_documents_and_urls_hide_the_server_path(smollm, tmp_path):
    """Issue 14 item 12: /sources/ served any .txt/.md/.html under the folder, hidden or added
    after indexing, and sources[].url carried the absolute file:// path."""
    from phi3.search import LocalIndex, build_index
    docs = tmp_path / "docs"
    (docs / ".hidden").mkdir(parents=True)
    (docs / "fact.md").write_text("# Fact\n\nThe quokka festival is held in Brumby.\n")
    (docs / ".hidden" / "keys.txt").write_text("secret\n")
    (docs / ".notes.md").write_text("secret\n")
    (docs / "blob.txt").write_bytes(b"\0secret")
    build_index(docs, tmp_path / "idx", progress=False)
    (docs / "later.txt").write_text("added after indexing\n")
    s = InProcess(smollm, searcher=LocalIndex(tmp_path / "idx"))
    try:
        r = client(s).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "quokka festival"}],
                                              max_tokens=2)
        src = r.model_extra["sources"][0]
        assert (src["source"], src["url"], src["link"]) == ("fact.md", "/sources/fact.md", "/sources/fact.md")
        assert str(tmp_path) not in json.dumps(r.model_extra["sources"])
        assert httpx.get(s.url + "/sources/fact.md").text.startswith("# Fact")
        for name in (".hidden/keys.txt", ".notes.md", "blob.txt", "later.txt", "%00", "fact.md%00.txt", "..%2Fidx"):
            r = httpx.get(s.url + "/sources/" + name)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", name
        (docs / "fact.md").unlink()  # an indexed name that has become a link leading out is not followed
        (docs / "fact.md").symlink_to("/etc/passwd")
        assert httpx.get(s.url + "/sources/fact.md").status_code == 404
    finally:
        s.close()


@pytest.fixture(scope="module")
def strict(smollm):
    """Small connection limits: 4 connections, 1 s for a request head or a body."""
    s = InProcess(smollm, limits=Limits(max_connections=4, header_timeout=1.0, body_timeout=1.0))
    yield s
    s.close()


def test_slowloris_half_a_request_head_is_cut_off(strict):
    """Issue 14 item 15: a client that sends half a request head and waits held its connection
    for ever (uvicorn's keep-alive timeout stops at the first byte)."""
    s = _raw(strict.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    reply = _read_all(s)  # returns once the server closes the connection
    s.close()
    assert reply.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and b"connection: close" in reply
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    # the same deadline holds for the next request on a kept-alive connection
    s = _raw(strict.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /health HTTP/1.1\r\nHo")
    reply = _read_all(s)
    s.close()
    assert reply.startswith(b"HTTP/1.1 200 OK") and b"HTTP/1.1 408 Request Timeout" in reply
    # and for a body that trickles
    s = _raw(strict.port, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"model\"")
    reply = _read_all(s)
    s.close()
    assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in reply


def test_idle_connections_beyond_the_limit_are_refused_cleanly(strict):
    """Issue 14 item 15: ~20k idle connections used up the file descriptors ('Too many open
    files'). Beyond --max-connections a connection gets a 503 and is closed at once."""
    strict.wait(lambda: len(strict.server.server_state.connections) == 0, "connections left from earlier")
    idle = [socket.create_connection(("127.0.0.1", strict.port)) for _ in range(4)]
    try:
        strict.wait(lambda: len(strict.server.server_state.connections) == 4, "idle connections not open")
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", strict.port))
            s.settimeout(60)
            reply = _read_all(s)
            s.close()
            assert reply.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), reply[:100]
            assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "too_many_connections"
        assert len(strict.server.server_state.connections) == 4
    finally:
        for s in idle:
            s.close()
    strict.wait(lambda: len(strict.server.server_state.connections) == 0, "closed connections were kept")
    assert httpx.get(strict.url + "/health").status_code == 200


def test_connection_limits_reach_uvicorn():
    config = make_server(object(), "127.0.0.1", 1, Limits()).config
    assert (config.limit_concurrency, config.timeout_keep_alive, config.h11_max_incomplete_event_size) == \
        (257, 5.0, 16 << 10)
    with pytest.raises(Exception, match="--header-timeout must be more than 0"):
        make_server(object(), "127.0.0.1", 1, Limits(header_timeout=0))


def test_api_key_sources_and_the_exposure_warning(tmp_path):
    """Issue 14 item 14: a key from a file or the environment (a command-line key shows in `ps`),
    and one line on stderr when the server is reachable from other machines without a key."""
    from phi3.cli import exposure_warning, serve_api_key
    from phi3.errors import Phi3Error
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    assert serve_api_key(None, str(key), {}) == "s3cret"
    assert serve_api_key(None, None, {"PHI3_API_KEY": "fromenv"}) == "fromenv"
    assert serve_api_key("given", None, {"PHI3_API_KEY": "fromenv"}) == "given"
    assert serve_api_key(None, None, {}) is None
    with pytest.raises(Phi3Error, match="not both"):
        serve_api_key("a", str(key), {})
    with pytest.raises(Phi3Error, match="cannot read it"):
        serve_api_key(None, str(tmp_path / "missing"), {})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(Phi3Error, match="empty"):
        serve_api_key(None, str(tmp_path / "empty"), {})
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert exposure_warning(host, has_key=False) is None
    assert exposure_warning("0.0.0.0", has_key=True) is None
    for host in ("0.0.0.0", "::", "192.168.1.5", "myhost"):
        w = exposure_warning(host, has_key=False)
        assert w.startswith(f"phi3: warning: --host {host} accepts connections from other machines") and "\n" not in w


def test_logprobs_streamed_and_not_and_a_prefill_is_continued(server):
    """OpenAI's logprobs shape, chat and completions, streamed and not, consistent with the text and
    with greedy decoding (that the numbers are log_softmax of the model's logits is checked exactly
    in test_engine on a tiny model: loading SmolLM2 here again cost ~15 CPU-s); continue_final_message
    continues an assistant prefill (vLLM's extension), as a G-Eval judge asks."""
    c = client(server)
    r = c.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=6, logprobs=True,
                                  top_logprobs=5)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert bytes(t.bytes).decode() == t.token and len(t.top_logprobs) == 5
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob  # greedy
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
    assert 0.5 < sum(2.718281828 ** x.logprob for x in content[0].top_logprobs) <= 1.0 + 1e-6

    chunks = list(c.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=6, logprobs=True,
                                            top_logprobs=5, stream=True))
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    plain = c.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=6)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content

    legacy = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "logprobs": 3}).json()
    lp = legacy["choices"][0]["logprobs"]
    assert "".join(lp["tokens"]) == legacy["choices"][0]["text"] and len(lp["token_logprobs"]) == 4
    assert all(len(top) == 3 and max(top.values()) == x for top, x in zip(lp["top_logprobs"], lp["token_logprobs"]))
    assert lp["text_offset"][0] == 0 and lp["text_offset"][1] == len(lp["tokens"][0])

    prefill = FRANCE + [{"role": "assistant", "content": "The capital of France is"}]
    cont = c.chat.completions.create(model=MODEL, messages=prefill, temperature=0, max_tokens=3, logprobs=True,
                                     extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert cont.choices[0].message.content.startswith(" Paris")  # the sentence goes on, no new turn
    # the same prompt as a raw completion of the template's text, cut after the prefill
    legacy_prompt = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                     "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
                     "The capital of France is")
    same = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": legacy_prompt, "max_tokens": 3, "temperature": 0}).json()
    assert same["choices"][0]["text"] == cont.choices[0].message.content
