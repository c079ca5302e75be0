"""`phi3 serve`: an OpenAI-compatible HTTP API, a chat page, and search-augmented answers.

    GET  /                      the chat page (phi3/web/chat.html, no build step)
    GET  /health                status, model, context size, queue
    GET  /v1/models             the served model (plus `context_length`)
    POST /v1/chat/completions   OpenAI chat completions, streamed (SSE) or not
    POST /v1/completions        OpenAI (legacy) text completions, streamed or not

Extension: a chat request may carry `"search": true|false` (default: on when the server was
started with --search). The last user message is then looked up in the index (or SearxNG), the
top passages go into the prompt as numbered sources, and the response carries them as
`"sources"` (in the first chunk when streaming).

Requests go to phi3.engine.Engine, which decodes all running requests together, so clients are
served at the same time and each gets the tokens it would get alone. Errors follow OpenAI's
shape, {"error": {"message", "type", "param", "code"}}, with 4xx statuses that say what to fix.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from urllib.parse import quote
from pathlib import Path
from typing import Any, AsyncIterator, Literal, Union

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from phi3.engine import Engine, QueueFull, Request
from phi3.errors import Phi3Error
from phi3.generate import Completion, SamplingParams

MAX_BODY_BYTES = 4 << 20  # far above any prompt that fits a 128K context as text
PAGE = Path(__file__).parent / "web" / "chat.html"


# --- request schemas (OpenAI's, the subset phi3 serves) ---------------------------------------------

class _Strict(BaseModel):
    # Strict: "0.5" is not a temperature. Unknown fields are ignored, as OpenAI clients send many.
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class ChatRequest(_Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    search: bool | None = None  # phi3 extension


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int]]
    echo: bool = False


# --- errors --------------------------------------------------------------------------------------------

class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and "[" in p))
    problem = err["msg"]
    if err["type"] == "missing":
        return f"missing required field '{where}'", where
    if err["type"] == "literal_error" and where.endswith("role"):
        return f"{where}: role must be 'system', 'user' or 'assistant'", where
    if "input" in err and err["type"].endswith(("_type", "_parsing")):
        return f"{where}: {problem} (got {json.dumps(err['input'])[:60]})", where
    return f"{where}: {problem}", where


# --- the app -------------------------------------------------------------------------------------------

def create_app(engine: Engine, model_id: str, api_key: str | None = None, searcher: Any = None,
               search_k: int = 3) -> FastAPI:
    """The FastAPI app serving `engine`'s model under the name `model_id`. `searcher` (a
    phi3.search.LocalIndex or SearxngSearch) enables search augmentation."""
    app = FastAPI(title="phi3", docs_url=None, redoc_url=None)
    model, tokenizer = engine.model, engine.tokenizer
    context = model.config.max_position_embeddings
    created = int(time.time())

    @app.middleware("http")
    async def guard(request: HTTPRequest, call_next):
        if api_key is not None and not (request.method == "GET" and request.url.path == "/"):
            sent = request.headers.get("authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' "
                                   "with the key given to `phi3 serve --api-key`", code="invalid_api_key")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return _error(413, f"request body of {length} bytes is over the limit of {MAX_BODY_BYTES} bytes; "
                               "send a shorter prompt", code="body_too_large")
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_: HTTPRequest, e: APIError) -> JSONResponse:
        return _error(e.status, e.message, e.param, e.code, e.kind)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            return _error(404, f"no route {request.method} {request.url.path}; see GET /v1/models, "
                               "POST /v1/chat/completions, POST /v1/completions", code="not_found")
        if e.status_code == 405:
            return _error(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
        return _error(e.status_code, str(e.detail))

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    docs_dir = Path(searcher.meta["docs_dir"]) if getattr(searcher, "meta", None) and searcher.meta.get("docs_dir") else None

    @app.get("/sources/{name:path}")
    async def source_file(name: str):
        """An indexed document, so that the page's source links open (browsers refuse file://
        links from an http page). Plain text always: an indexed HTML file must not run scripts
        in the page's origin."""
        from fastapi.responses import FileResponse
        from phi3.search import SUPPORTED_SUFFIXES
        path = (docs_dir / name).resolve() if docs_dir is not None else None
        if path is None or not path.is_relative_to(docs_dir) or not path.is_file() or path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise APIError(404, f"no indexed document '{name}'", code="not_found")
        return FileResponse(path, media_type="text/plain; charset=utf-8",
                            headers={"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"})

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id, "context_length": context, "search": searcher is not None,
                **engine.counts()}

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "phi3", "context_length": context}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str) -> dict:
        if name != model_id:
            raise APIError(404, f"model '{name}' does not exist; this server serves '{model_id}'",
                           "model", "model_not_found")
        return model_card()

    async def parse(request: HTTPRequest, schema: type[_Strict]) -> Any:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise APIError(413, f"request body is over the limit of {MAX_BODY_BYTES} bytes; send a shorter prompt",
                               code="body_too_large")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON ({e}); send a JSON object", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object", code="invalid_json")
        try:
            req = schema.model_validate(data)
        except ValidationError as e:
            message, param = _validation_message(e)
            raise APIError(400, message, param, "invalid_value") from None
        if req.model != model_id:
            raise APIError(404, f"model '{req.model}' does not exist; this server serves '{model_id}' "
                                "(see GET /v1/models)", "model", "model_not_found")
        if req.n != 1:
            raise APIError(400, f"n={req.n} is not supported; phi3 returns one choice per request (n=1)", "n")
        return req

    def sampling(req: _Sampling, prompt_len: int, max_tokens: int | None, default_max: int | None) -> SamplingParams:
        if max_tokens is None:
            max_tokens = context - prompt_len if default_max is None else min(default_max, context - prompt_len)
        if prompt_len + max_tokens > context:
            raise APIError(400, f"the prompt's {prompt_len} tokens plus max_tokens={max_tokens} exceed the model's "
                                f"context of {context} tokens; shorten the messages or lower max_tokens",
                           "max_tokens" if prompt_len < context else "messages", "context_length_exceeded")
        if max_tokens < 1:
            raise APIError(400, f"the prompt's {prompt_len} tokens fill the model's context of {context} tokens; "
                                "shorten the messages", "messages", "context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4:
            raise APIError(400, f"stop has {len(stop)} strings; at most 4 are allowed", "stop")
        return SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                              seed=req.seed, stop=tuple(stop))

    def submit(prompt: list[int], params: SamplingParams) -> tuple[Request, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(kind: str, value: object) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        request = Request(prompt, params, on_event)
        try:
            engine.submit(request)
        except QueueFull as e:
            raise APIError(429, f"server busy: {e}", code="queue_full", kind="rate_limit_error") from None
        except Phi3Error as e:
            raise APIError(400, str(e)) from None
        return request, events

    async def collect(http: HTTPRequest, request: Request, events: asyncio.Queue) -> Completion:
        while True:
            try:
                kind, value = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    request.cancel()
                continue
            if kind == "done":
                return value  # type: ignore[return-value]
            if kind == "error":
                raise APIError(500, str(value), kind="server_error")

    async def sse(chunks: AsyncIterator[dict], request: Request) -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            request.cancel()  # the client went away (or we are done: then this changes nothing)

    async def follow(events: asyncio.Queue, chunk: dict, piece: Any, final: Any,
                     include_usage: bool) -> AsyncIterator[dict]:
        """The engine's events as stream chunks: one per text piece, then the finish reason (and
        usage when asked), or an error object."""
        while True:
            kind, value = await events.get()
            if kind == "text":
                yield {**chunk, "choices": [{"index": 0, "logprobs": None, "finish_reason": None, **piece(value)}]}
            elif kind == "done":
                yield {**chunk, "choices": [{"index": 0, "logprobs": None, **final(value.finish_reason)}]}
                if include_usage:
                    yield {**chunk, "choices": [], "usage": usage(value)}
                return
            else:
                yield {"error": {"message": str(value), "type": "server_error", "param": None, "code": None}}
                return

    def usage(c: Completion) -> dict:
        return {"prompt_tokens": c.prompt_tokens, "completion_tokens": len(c.token_ids),
                "total_tokens": c.prompt_tokens + len(c.token_ids)}

    def search_sources(req: ChatRequest, messages: list[dict]) -> tuple[list[dict], list[dict]]:
        wanted = req.search if req.search is not None else searcher is not None
        if not wanted:
            return messages, []
        if searcher is None:
            raise APIError(400, "search was asked for but this server has no index; start it with "
                                "`phi3 serve --search INDEX` (see `phi3 index build`)", "search")
        from phi3.search import augment, query_of
        try:
            passages = searcher.search(query_of(messages), search_k)
        except Phi3Error as e:
            raise APIError(502, f"search failed: {e}", "search", kind="server_error") from None
        sources = [{"index": i + 1, "title": p.title, "url": p.url, "source": p.source, "snippet": p.text[:400],
                    **({"link": "/sources/" + quote(p.source)} if docs_dir is not None else {})}
                   for i, p in enumerate(passages)]
        return augment(messages, passages), sources

    @app.post("/v1/chat/completions")
    async def chat(http: HTTPRequest):
        req: ChatRequest = await parse(http, ChatRequest)
        if not req.messages:
            raise APIError(400, "messages is empty; send at least one message, e.g. "
                                '[{"role": "user", "content": "Hello"}]', "messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        messages, sources = await asyncio.to_thread(search_sources, req, messages)
        try:
            prompt = tokenizer.encode_chat(messages)
        except Exception as e:  # noqa: BLE001 - a template may refuse a message order
            raise APIError(400, f"the chat template rejected these messages: {e}", "messages") from None
        params = sampling(req, len(prompt), req.max_completion_tokens or req.max_tokens, None)
        request, events = submit(prompt, params)
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": rid, "created": now, "model": model_id, "system_fingerprint": None}
        if not req.stream:
            c = await collect(http, request, events)
            body = {**base, "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                                 "logprobs": None, "finish_reason": c.finish_reason}],
                    "usage": usage(c)}
            if sources:
                body["sources"] = sources
            return body
        include_usage = bool((req.stream_options or {}).get("include_usage"))

        async def chunks() -> AsyncIterator[dict]:
            chunk = {**base, "object": "chat.completion.chunk"}
            first = {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}]}
            if sources:
                first["sources"] = sources
            yield first
            async for c in follow(events, chunk, lambda text: {"delta": {"content": text}},
                                  lambda reason: {"delta": {}, "finish_reason": reason}, include_usage):
                yield c

        return StreamingResponse(sse(chunks(), request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        req: CompletionRequest = await parse(http, CompletionRequest)
        if req.echo:
            raise APIError(400, "echo is not supported; the response holds the completion only", "echo")
        p = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], str):
            if len(p) != 1:
                raise APIError(400, f"prompt holds {len(p)} strings; send one prompt per request", "prompt")
            p = p[0]
        if isinstance(p, str):
            if not p:
                raise APIError(400, "prompt is empty; send some text to complete", "prompt")
            prompt = tokenizer.encode(p)
        else:
            prompt = list(p)
            if not prompt:
                raise APIError(400, "prompt is empty; send some text to complete", "prompt")
            bad = [t for t in prompt if not 0 <= t < model.config.vocab_size]
            if bad:
                raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary (0..{model.config.vocab_size - 1})",
                               "prompt")
        params = sampling(req, len(prompt), req.max_tokens, 16)  # OpenAI's default for completions
        request, events = submit(prompt, params)
        rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": now, "model": model_id, "system_fingerprint": None}
        if not req.stream:
            c = await collect(http, request, events)
            return {**base, "choices": [{"index": 0, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}],
                    "usage": usage(c)}
        include_usage = bool((req.stream_options or {}).get("include_usage"))

        async def chunks() -> AsyncIterator[dict]:
            async for c in follow(events, base, lambda text: {"text": text},
                                  lambda reason: {"text": "", "finish_reason": reason}, include_usage):
                yield c

        return StreamingResponse(sse(chunks(), request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def serve(lm: Any, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, max_batch: int = 16,
          max_queue: int = 64, searcher: Any = None, search_k: int = 3, model_id: str | None = None) -> None:
    """Run the server until interrupted (the `phi3 serve` command): the engine in this (main)
    thread, where its OpenMP kernels run fastest, and uvicorn in a thread beside it."""
    import threading

    import uvicorn
    engine = Engine(lm.model, lm.tokenizer, max_batch=max_batch, max_queue=max_queue)
    app = create_app(engine, model_id or lm.path.name, api_key=api_key, searcher=searcher, search_k=search_k)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))

    def http() -> None:
        try:
            server.run()
        finally:
            engine.stop()  # the port was taken, or the server was told to exit: end the engine too

    thread = threading.Thread(target=http, name="phi3-http", daemon=True)
    thread.start()
    try:
        engine.run_forever()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    if not server.started:
        raise Phi3Error(f"the HTTP server could not start on {host}:{port}; see the message above")


def check_port(host: str, port: int) -> None:
    """Fail in a second, before the model loads, when the address cannot be bound."""
    import socket
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise Phi3Error(f"--host {host}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise Phi3Error(f"cannot listen on {host}:{port}: {e.strerror}; choose another --port "
                            "(or stop what is using it)") from None
