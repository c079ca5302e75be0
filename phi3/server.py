"""`phi3 serve`: an OpenAI-compatible HTTP API, a chat page, and search-augmented answers.

    GET  /                      the chat page (phi3/web/chat.html, no build step)
    GET  /health                status, model, context size, queue
    GET  /v1/models             the served model (plus `context_length`)
    POST /v1/chat/completions   OpenAI chat completions, streamed (SSE) or not
    POST /v1/completions        OpenAI (legacy) text completions, streamed or not

Token log-probabilities as OpenAI returns them: chat `logprobs: true` with `top_logprobs: 0..20`
gives choices[0].logprobs.content = [{token, logprob, bytes, top_logprobs: [{token, logprob,
bytes}]}], one per generated token (the stop token excluded), in each stream chunk for the tokens
whose text it carries; completions' `logprobs: 0..20` gives the legacy {tokens, token_logprobs,
top_logprobs, text_offset}. They are the log-softmax of the model's raw logits, before repetition
penalty, temperature and top-p (OpenAI's and vLLM's convention; phi3.engine.token_logprobs).

Extension: a chat request may carry `"search": true|false` (default: on when the server was
started with --search). The last user message is then looked up in the index (or SearxNG), the
top passages go into the prompt as numbered sources, and the response carries them as
`"sources"` (in the first chunk when streaming). As vLLM, `"continue_final_message": true` (with
`"add_generation_prompt": false`) continues the last message, an assistant prefill, instead of
opening a new assistant turn.

Requests go to phi3.engine.Engine, which decodes all running requests together, so clients are
served at the same time and each gets the tokens it would get alone. Errors follow OpenAI's
shape, {"error": {"message", "type", "param", "code"}}, with 4xx statuses that say what to fix.

Hostile or careless clients (issue 14): a request is checked before it costs anything. The body
is bounded (4 MiB) and must arrive within --body-timeout; it is parsed, checked and validated off
the event loop; a prompt too long for the context by its character count alone is refused before
it is tokenized, and tokenizing runs in a worker thread, so one huge prompt cannot stall /health
or other streams. POSTs must say `Content-Type: application/json` (a page on another origin can
send text/plain without asking); without an API key the Host header must name this server (DNS
rebinding); responses may not be framed. A client that goes away, streaming or not, has its
generation stopped within one decode step. At the connection level (`Limits`), a request head
must arrive within --header-timeout, idle keep-alive connections close after --keep-alive-timeout,
and connections beyond --max-connections get a 503 and are closed at once, before they can use
up file descriptors.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import time
import uuid
from dataclasses import dataclass
from urllib.parse import quote
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, Literal, Union

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from phi3.engine import MAX_TOP_LOGPROBS, Engine, QueueFull, Request, TokenLogprobs
from phi3.errors import Phi3Error
from phi3.generate import Completion, SamplingParams

MAX_BODY_BYTES = 4 << 20  # far above any prompt that fits a 128K context as text
MAX_JSON_DEPTH = 64  # an OpenAI request nests 4 deep (body, messages, message, content part)
INT64 = (-(1 << 63), (1 << 63) - 1)
PAGE = Path(__file__).parent / "web" / "chat.html"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
# On every response: the API and the page may not be framed by another site (clickjacking).
SECURITY_HEADERS = {"content-security-policy": "frame-ancestors 'none'", "x-frame-options": "DENY",
                    "x-content-type-options": "nosniff"}


@dataclass(frozen=True)
class Limits:
    """Connection limits for uvicorn (`phi3 serve` flags of the same names). Without them a client
    that sends half a request head and waits holds a connection for ever, and ~20k idle
    connections used up the process's file descriptors (2047 'Too many open files' tracebacks)."""

    max_connections: int = 256     # open connections; more get 503 and are closed at once
    header_timeout: float = 10.0   # seconds for a request head to arrive (after connecting, or after the last response)
    keep_alive_timeout: float = 5.0  # an idle keep-alive connection closes after this (uvicorn's default)
    body_timeout: float = 60.0     # seconds for a whole body to arrive: 4 MiB at ~0.5 Mbit/s
    max_header_bytes: int = 16 << 10  # a request head larger than this gets 400 (h11's default, stated)

    def check(self) -> None:
        if self.max_connections < 1:
            raise Phi3Error(f"--max-connections must be at least 1, got {self.max_connections}")
        for name, value in (("--header-timeout", self.header_timeout), ("--keep-alive-timeout", self.keep_alive_timeout),
                            ("--body-timeout", self.body_timeout)):
            if not value > 0:
                raise Phi3Error(f"{name} must be more than 0 seconds, got {value}")


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
    seed: int | None = Field(default=None, ge=INT64[0], le=INT64[1])  # OpenAI's seed is an int64
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class ChatRequest(_Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # vLLM's extension: the reply continues the last (assistant) message instead of opening a new
    # turn, so a judge can prefill "Educational score:" and read the digit's probabilities next
    continue_final_message: bool = False
    add_generation_prompt: bool | None = None
    search: bool | None = None  # phi3 extension


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # legacy: the number of top alternatives


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
        return f"{where}: {problem} (got {_short(err['input'])})", where
    return f"{where}: {problem}", where


def _short(value: Any) -> str:
    try:
        return json.dumps(value)[:60]
    except (ValueError, TypeError, RecursionError):
        return type(value).__name__


def _walk(data: Any) -> None:
    """Refuse what would fail later as a 500: nesting deeper than MAX_JSON_DEPTH, and strings (or
    keys) holding a lone UTF-16 surrogate, which JSON's \\ud800 escapes allow but no tokenizer,
    file name or UTF-8 response can carry. Iterative: depth cannot overflow the stack."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep; "
                                "an OpenAI request needs a handful", code="invalid_json")
        if isinstance(value, dict):
            for k, v in value.items():
                _check_text(k, f"{where}.{k}".lstrip("."))
                stack.append((v, f"{where}.{k}".lstrip("."), depth + 1))
        elif isinstance(value, list):
            stack.extend((v, f"{where}.{i}".lstrip("."), depth + 1) for i, v in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, where)


def _check_text(text: str, where: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"{where or 'the body'}: holds a lone UTF-16 surrogate ({ascii(text[e.start])} at "
                            f"character {e.start}); send valid Unicode text", where or None, "invalid_value") from None


def _unsupported(data: dict) -> None:
    """OpenAI features phi3 does not serve get a 400 naming them, instead of being silently ignored
    (or, for image parts, a message about strings)."""
    def no(feature: str, why: str) -> None:
        raise APIError(400, f"{feature} is not supported: {why}", feature.split(" ")[0].split("=")[0],
                       "unsupported_feature")

    for key in ("tools", "functions"):
        if data.get(key):
            no(key, "phi3 does not call tools or functions; send plain messages")
    for key in ("tool_choice", "function_call"):
        if data.get(key) not in (None, "none"):
            no(key, "phi3 does not call tools or functions; leave it out or send \"none\"")
    fmt = data.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        kind = fmt.get("type") if isinstance(fmt, dict) else fmt
        no(f"response_format {_short(kind)}", "phi3 returns free text only ({\"type\": \"text\"})")
    if data.get("modalities") not in (None, ["text"]) or data.get("audio") is not None:
        no("audio" if data.get("audio") is not None else "modalities", "phi3 serves a text-only model")
    if data.get("best_of") not in (None, 1):
        no("best_of", "phi3 returns one completion per request")
    if data.get("suffix") not in (None, ""):
        no("suffix", "phi3 completes text at the end only (no insertion)")
    messages = data.get("messages")
    for i, m in enumerate(messages if isinstance(messages, list) else []):
        content = m.get("content") if isinstance(m, dict) else None
        for j, part in enumerate(content if isinstance(content, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                raise APIError(400, f"messages.{i}.content.{j}: '{kind[:40]}' content parts are not supported; "
                                    "phi3 serves a text-only model (send text parts or a string)",
                               f"messages.{i}.content.{j}", "unsupported_feature")


def _host_name(host: str) -> str:
    """The name in a Host header, without the port, lowercased ("[::1]:8000" -> "[::1]")."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[:host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name[1:-1] if name.startswith("[") else name)
        return True
    except ValueError:
        return False


class _Guard:
    """Checks every request before the app sees it (a plain ASGI middleware: it leaves `receive`
    alone, so a handler still hears the client's disconnect), and adds SECURITY_HEADERS to every
    response."""

    def __init__(self, app: Any, api_key: str | None, allowed_hosts: frozenset[str]) -> None:
        self.app, self.api_key, self.allowed_hosts = app, api_key, allowed_hosts

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def secured(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    if name == "content-security-policy" and name in headers:
                        if "frame-ancestors" not in headers[name]:  # /sources/ adds "sandbox" of its own
                            headers[name] = f"{headers[name]}; {value}"
                    elif name not in headers:
                        headers[name] = value
            await send(message)

        refusal = self.refusal(scope)
        if refusal is not None:
            return await refusal(scope, receive, secured)
        await self.app(scope, receive, secured)

    def refusal(self, scope: dict) -> JSONResponse | None:
        headers = Headers(scope=scope)
        method, path = scope["method"], scope["path"]
        if self.api_key is None:
            # Without a key, a page from any site could reach a loopback server through DNS
            # rebinding (its own name resolving to 127.0.0.1): the browser then sends that name as
            # Host. IP literals cannot be rebound, so any IP is accepted, and names only when known.
            host = headers.get("host")
            if host is not None and (name := _host_name(host)) not in self.allowed_hosts and not _is_ip(name):
                return _error(400, f"the Host header names '{name[:100]}', which is not this server: use its address "
                                   "or localhost, start it with --allow-host NAME, or set an API key",
                              code="invalid_host")
        if self.api_key is not None and not (method in ("GET", "HEAD") and path == "/"):
            scheme, _, sent = headers.get("authorization", "").strip().partition(" ")
            # RFC 9110: the scheme is case-insensitive ("bearer KEY" is as good as "Bearer KEY")
            ok = scheme.lower() == "bearer" and hmac.compare_digest(sent.strip().encode("utf-8", "replace"),
                                                                    self.api_key.encode("utf-8"))
            if not ok:
                return _error(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' "
                                   "with the key `phi3 serve` was given (--api-key-file, PHI3_API_KEY or --api-key)",
                              code="invalid_api_key")
        if method == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                # a cross-origin page may POST text/plain without a CORS preflight: refusing it means
                # another site cannot start generations on this server
                return _error(415, f"Content-Type must be application/json (got '{kind[:60] or 'none'}'); "
                                   "send the body as JSON with that header", code="unsupported_media_type")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return _error(413, f"request body of {length} bytes is over the limit of {MAX_BODY_BYTES} bytes; "
                               "send a shorter prompt", code="body_too_large")
        return None


# --- the app -------------------------------------------------------------------------------------------

class TokenSpeller:
    """A token id's text and UTF-8 bytes for OpenAI's logprobs objects. `bytes` is exact (a token may
    hold part of a character: its text then shows U+FFFD, as OpenAI's does); ids are cached."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self.cache.get(token_id)
        if hit is None:
            raw = self.tokenizer.token_bytes(token_id)
            hit = self.cache[token_id] = (raw.decode("utf-8", "replace"), list(raw))
        return hit

    def chat_entry(self, t: TokenLogprobs) -> dict:
        """One element of choices[].logprobs.content."""
        token, raw = self(t.token_id)
        return {"token": token, "logprob": t.logprob, "bytes": raw,
                "top_logprobs": [{"token": self(i)[0], "logprob": lp, "bytes": self(i)[1]} for i, lp in t.top]}

    def legacy(self, entries: list[TokenLogprobs], offset: int = 0) -> dict:
        """The completions API's logprobs object; `offset`: text_offset of the first token."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t in entries:
            token = self(t.token_id)[0]
            out["tokens"].append(token)
            out["token_logprobs"].append(t.logprob)
            top: dict[str, float] = {}
            for i, lp in t.top:  # two ids spelling the same text (partial characters): the likelier
                top.setdefault(self(i)[0], lp)
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            offset += len(token)
        return out


def create_app(engine: Engine, model_id: str, api_key: str | None = None, searcher: Any = None,
               search_k: int = 3, host: str = "127.0.0.1", allowed_hosts: Iterable[str] = (),
               body_timeout: float = Limits.body_timeout) -> FastAPI:
    """The FastAPI app serving `engine`'s model under the name `model_id`. `searcher` (a
    phi3.search.LocalIndex or SearxngSearch) enables search augmentation. Without `api_key`,
    requests must name `host` (the bound address), localhost, an IP address or one of
    `allowed_hosts` in their Host header."""
    app = FastAPI(title="phi3", docs_url=None, redoc_url=None)
    model, tokenizer = engine.model, engine.tokenizer
    context = model.config.max_position_embeddings
    speller = TokenSpeller(tokenizer)
    created = int(time.time())
    bound = host.lower() if not _is_ip(host) or ":" not in host or host.startswith("[") else f"[{host.lower()}]"
    app.add_middleware(_Guard, api_key=api_key,
                       allowed_hosts=frozenset([*LOOPBACK_NAMES, bound, *(_host_name(h) for h in allowed_hosts)]))
    # The longest text one token covers (81 characters for SmolLM2: a run of '#'): a prompt of more
    # than context x that many characters cannot fit, and is refused before tokenizing. A tokenizer
    # that normalizes text away could only make this refuse a prompt already absurdly long.
    vocab = tokenizer.vocab() if hasattr(tokenizer, "vocab") else {}
    max_chars = context * max((len(t) for t in vocab), default=1 << 10)

    def check_chars(n: int, what: str, param: str) -> None:
        if n > max_chars:
            raise APIError(400, f"{what} {'hold' if what.endswith('s') else 'holds'} {n} characters, more than the model's context of {context} tokens "
                                f"can take (a token here covers at most {max_chars // context} characters); "
                                f"shorten {what}", param, "context_length_exceeded")

    @app.exception_handler(Exception)
    async def internal_error(_: HTTPRequest, e: Exception) -> JSONResponse:
        # a bug, not the client's fault: still an OpenAI-shaped body, not plain text
        return _error(500, f"internal error ({type(e).__name__}); the server log has the details",
                      kind="server_error", code="internal_error")

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

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    docs_dir = Path(searcher.meta["docs_dir"]) if getattr(searcher, "meta", None) and searcher.meta.get("docs_dir") else None
    # What /sources/ may serve: the documents the index lists, no other file under the folder
    # (hidden, skipped or added later), and none at all for an index that does not list them.
    served: frozenset[str] = frozenset(getattr(searcher, "sources", ())) if docs_dir is not None else frozenset()

    @app.get("/sources/{name:path}")
    async def source_file(name: str):
        """An indexed document, so that the page's source links open (browsers refuse file://
        links from an http page). Plain text always: an indexed HTML file must not run scripts
        in the page's origin."""
        from fastapi.responses import FileResponse
        from phi3.search import SUPPORTED_SUFFIXES
        path = None
        if name in served:
            try:  # resolved again now: the file may have become a link leading out since indexing
                path = (docs_dir / name).resolve()
                if not (path.is_relative_to(docs_dir) and path.is_file() and path.suffix.lower() in SUPPORTED_SUFFIXES):
                    path = None
            except (OSError, ValueError, RuntimeError):
                path = None
        if path is None:
            raise APIError(404, f"no indexed document '{_short(name)[1:-1]}'", code="not_found")
        return FileResponse(path, media_type="text/plain; charset=utf-8",
                            headers={"Content-Security-Policy": "sandbox"})

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
            raise APIError(404, f"model '{name[:100]}' does not exist; this server serves '{model_id}'",
                           "model", "model_not_found")
        return model_card()

    async def parse(request: HTTPRequest, schema: type[_Strict]) -> Any:
        body = bytearray()
        try:
            async with asyncio.timeout(body_timeout):  # a body trickling in a byte at a time holds a handler
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > MAX_BODY_BYTES:
                        raise APIError(413, f"request body is over the limit of {MAX_BODY_BYTES} bytes; "
                                            "send a shorter prompt", code="body_too_large")
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within {body_timeout:g} s; send it at once",
                           code="request_timeout") from None
        # decoding and validating 4 MiB of JSON takes tens of milliseconds: not on the event loop
        req = await asyncio.to_thread(decode, bytes(body), schema)
        if req.model != model_id:
            raise APIError(404, f"model '{req.model[:100]}' does not exist; this server serves '{model_id}' "
                                "(see GET /v1/models)", "model", "model_not_found")
        if req.n != 1:
            raise APIError(400, f"n={req.n} is not supported; phi3 returns one choice per request (n=1)", "n")
        return req

    def decode(body: bytes, schema: type[_Strict]) -> Any:
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON ({e}); send a JSON object", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep; an OpenAI "
                                "request needs a handful", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object", code="invalid_json")
        _walk(data)
        _unsupported(data)
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            message, param = _validation_message(e)
            raise APIError(400, message, param, "invalid_value") from None

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

    def submit(prompt: list[int], params: SamplingParams, logprobs: int | None = None) -> tuple[Request, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(kind: str, value: object) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        request = Request(prompt, params, on_event, logprobs=logprobs)
        try:
            engine.submit(request)
        except QueueFull as e:
            raise APIError(429, f"server busy: {e}", code="queue_full", kind="rate_limit_error") from None
        except Phi3Error as e:
            raise APIError(400, str(e)) from None
        return request, events

    async def collect(http: HTTPRequest, request: Request, events: asyncio.Queue,
                      logprobs: list[TokenLogprobs] | None = None) -> Completion:
        """The completion of a non-streamed request (its tokens' log-probabilities appended to
        `logprobs`). The client is watched all along: when it goes
        away the request is cancelled at once, and the engine drops it before its next decode step
        (polling for a disconnect only while no token came, as before, never fired while tokens flowed)."""
        watcher = asyncio.create_task(cancel_on_disconnect(http, request))
        try:
            while True:
                kind, value = await events.get()
                if kind == "logprobs":
                    if logprobs is not None:
                        logprobs.append(value)  # type: ignore[arg-type]
                    continue
                if kind == "done":
                    return value  # type: ignore[return-value]
                if kind == "error":
                    raise APIError(500, str(value), kind="server_error")
        finally:
            watcher.cancel()

    async def cancel_on_disconnect(http: HTTPRequest, request: Request) -> None:
        # The body has been read: the next ASGI message is http.disconnect, sent when the client
        # closes its connection (or once the response is complete, when this is cancelled anyway).
        while (await http.receive())["type"] != "http.disconnect":
            pass
        request.cancel()

    async def sse(chunks: AsyncIterator[dict], request: Request) -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            request.cancel()  # the client went away (or we are done: then this changes nothing)

    async def follow(events: asyncio.Queue, chunk: dict, piece: Any, final: Any,
                     include_usage: bool, spell: Any = None) -> AsyncIterator[dict]:
        """The engine's events as stream chunks: one per text piece, then the finish reason (and
        usage when asked), or an error object. With `spell` (a list of TokenLogprobs -> the
        logprobs object), each chunk carries the log-probabilities of the tokens since the last
        chunk: text held back (a partial character, a possible stop string) comes later with
        its tokens' entries, and what is left goes with the finish reason."""
        pending: list[TokenLogprobs] = []

        def take() -> Any:
            if spell is None:
                return None
            out = spell(pending[:])
            pending.clear()
            return out

        while True:
            kind, value = await events.get()
            if kind == "logprobs":
                pending.append(value)  # type: ignore[arg-type]
            elif kind == "text":
                yield {**chunk, "choices": [{"index": 0, "logprobs": take(), "finish_reason": None, **piece(value)}]}
            elif kind == "done":
                yield {**chunk, "choices": [{"index": 0, "logprobs": take() if pending else None,
                                             **final(value.finish_reason)}]}
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
        local = getattr(searcher, "sources", None) is not None
        sources = []
        for i, p in enumerate(passages):
            source = {"index": i + 1, "title": p.title, "url": p.url, "source": p.source, "snippet": p.text[:400]}
            if local:  # never the file:// URL: it would tell every client the server's folder layout
                link = "/sources/" + quote(p.source) if p.source in served else None
                source["url"] = link or p.source
                if link:
                    source["link"] = link
            sources.append(source)
        return augment(messages, passages), sources

    @app.post("/v1/chat/completions")
    async def chat(http: HTTPRequest):
        req: ChatRequest = await parse(http, ChatRequest)
        if not req.messages:
            raise APIError(400, "messages is empty; send at least one message, e.g. "
                                '[{"role": "user", "content": "Hello"}]', "messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        check_chars(sum(len(m["content"]) for m in messages), "the messages", "messages")
        messages, sources = await asyncio.to_thread(search_sources, req, messages)
        if req.continue_final_message:
            if req.add_generation_prompt:
                raise APIError(400, "continue_final_message and add_generation_prompt cannot both be true; "
                                    "send add_generation_prompt: false", "add_generation_prompt")
            if messages[-1]["role"] != "assistant" or not messages[-1]["content"]:
                raise APIError(400, "continue_final_message needs a last message from the assistant with some "
                                    "content (the text to continue)", "messages")

        def encode() -> list[int]:
            if not req.continue_final_message:
                return tokenizer.encode_chat(messages)
            # vLLM's way: render the conversation closed, then cut after the last message's text
            rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
            end = rendered.rfind(messages[-1]["content"])
            if end < 0:
                raise ValueError("the template does not hold the last message's text as it is")
            return tokenizer.encode(rendered[:end + len(messages[-1]["content"])], add_bos=False)

        try:
            prompt = await asyncio.to_thread(encode)
        except Exception as e:  # noqa: BLE001 - a template may refuse a message order
            raise APIError(400, f"the chat template rejected these messages: {e}", "messages") from None
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true; send both", "top_logprobs")
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = sampling(req, len(prompt), req.max_completion_tokens or req.max_tokens, None)
        request, events = submit(prompt, params, top)
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": rid, "created": now, "model": model_id, "system_fingerprint": None}
        spell = (lambda entries: {"content": [speller.chat_entry(t) for t in entries], "refusal": None}) \
            if top is not None else None
        if not req.stream:
            entries: list[TokenLogprobs] = []
            c = await collect(http, request, events, entries)
            body = {**base, "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                                 "logprobs": spell(entries) if spell else None, "finish_reason": c.finish_reason}],
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
                                  lambda reason: {"delta": {}, "finish_reason": reason}, include_usage, spell):
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
            check_chars(len(p), "the prompt", "prompt")
            prompt = await asyncio.to_thread(tokenizer.encode, p)
        else:
            prompt = list(p)
            if not prompt:
                raise APIError(400, "prompt is empty; send some text to complete", "prompt")
            bad = [t for t in prompt if not 0 <= t < model.config.vocab_size]
            if bad:
                raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary (0..{model.config.vocab_size - 1})",
                               "prompt")
        params = sampling(req, len(prompt), req.max_tokens, 16)  # OpenAI's default for completions
        request, events = submit(prompt, params, req.logprobs)
        rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": now, "model": model_id, "system_fingerprint": None}
        if not req.stream:
            entries: list[TokenLogprobs] = []
            c = await collect(http, request, events, entries)
            return {**base, "choices": [{"index": 0, "text": c.text,
                                         "logprobs": speller.legacy(entries) if req.logprobs is not None else None,
                                         "finish_reason": c.finish_reason}],
                    "usage": usage(c)}
        offset = [0]

        def legacy(entries: list[TokenLogprobs]) -> dict:
            out = speller.legacy(entries, offset[0])
            offset[0] += sum(len(t) for t in out["tokens"])
            return out
        include_usage = bool((req.stream_options or {}).get("include_usage"))

        async def chunks() -> AsyncIterator[dict]:
            async for c in follow(events, base, lambda text: {"text": text},
                                  lambda reason: {"text": "", "finish_reason": reason}, include_usage,
                                  legacy if req.logprobs is not None else None):
                yield c

        return StreamingResponse(sse(chunks(), request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _protocol(limits: Limits) -> type:
    """uvicorn's h11 protocol with what it lacks: a deadline for the request head, and a cap on open
    connections. (uvicorn's limit_concurrency answers 503 only once a request arrives, and its
    keep-alive timeout stops at the first byte, so half a request head held a connection for ever.)"""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    def refusal(status: int, reason: str, message: str, code: str) -> bytes:
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": code}}).encode()
        head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
                "connection: close\r\n" + "".join(f"{k}: {v}\r\n" for k, v in SECURITY_HEADERS.items()) + "\r\n")
        return head.encode() + body

    too_many = refusal(503, "Service Unavailable", f"the server has {limits.max_connections} connections open, its "
                       "limit (--max-connections); close idle ones or retry later", "too_many_connections")
    too_slow = refusal(408, "Request Timeout", f"the request head did not arrive within {limits.header_timeout:g} s "
                       "(--header-timeout)", "request_timeout")

    class Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                # refused at once, closing the socket: idle connections cannot pile up to the
                # file-descriptor limit, and the client gets a reason rather than a reset
                self.connections.discard(self)  # gone already: a burst of refusals must not refuse others
                transport.write(too_many)
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(limits.header_timeout, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            between_requests = self.cycle is None or self.cycle.response_complete
            if between_requests and not self.transport.is_closing():
                self.transport.write(too_slow)
                self.transport.close()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a whole request head arrived: its deadline is met
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's head has the same deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return Protocol


def make_server(app: Any, host: str, port: int, limits: Limits = Limits()) -> Any:
    """A uvicorn.Server for `app` with `limits` (not started)."""
    import uvicorn
    limits.check()
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", http=_protocol(limits),
        # each connection runs at most one request at a time, so the connection cap bounds requests
        # too; uvicorn's own cap (which answers 503 in plain text) is set just above it, as a backstop
        limit_concurrency=limits.max_connections + 1,
        timeout_keep_alive=limits.keep_alive_timeout,  # type: ignore[arg-type] (a float works)
        h11_max_incomplete_event_size=limits.max_header_bytes)
    return uvicorn.Server(config)


def serve(lm: Any, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, max_batch: int = 16,
          max_queue: int = 64, searcher: Any = None, search_k: int = 3, model_id: str | None = None,
          limits: Limits = Limits(), allowed_hosts: Iterable[str] = ()) -> None:
    """Run the server until interrupted (the `phi3 serve` command): the engine in this (main)
    thread, where its OpenMP kernels run fastest, and uvicorn in a thread beside it."""
    import threading

    engine = Engine(lm.model, lm.tokenizer, max_batch=max_batch, max_queue=max_queue)
    app = create_app(engine, model_id or lm.path.name, api_key=api_key, searcher=searcher, search_k=search_k,
                     host=host, allowed_hosts=allowed_hosts, body_timeout=limits.body_timeout)
    server = make_server(app, host, port, limits)

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
