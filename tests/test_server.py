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
    """One request at a time, one waiting, and an API key."""
    s = LiveServer("--model", str(smollm_gguf), "--max-batch", "1", "--max-queue", "1", "--api-key", "sekrit",
                   log=tmp_path_factory.mktemp("serve") / "log")
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
    assert sources[0]["url"].startswith("file://") and sources[0]["url"].endswith("vexaria.md")
    assert sources[0]["title"] == "Vexaria"
    doc = httpx.get(search_server.url + sources[0]["link"])  # the page's link to the document
    assert doc.status_code == 200 and "Lumora" in doc.text and doc.headers["content-type"].startswith("text/plain")
    assert httpx.get(search_server.url + "/sources/..%2F..%2Fetc%2Fpasswd").status_code == 404
    assert httpx.get(search_server.url + "/sources/nothing.md").status_code == 404

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
