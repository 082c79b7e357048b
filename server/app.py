"""The ASGI app (Starlette + sse-starlette + pydantic): `POST /v1/chat/completions`, `GET /v1/models`,
`GET /health`, and the page at `/`.

The engine serves N requests at once ("slots": N = the engine's `parallel`, 1 by default). Requests wait in a
bounded FIFO queue in front of the slots: when it is full they get 429 at once, and one that waited longer than the
queue timeout gets 503. Each admitted request runs in a worker thread: with one slot it holds the engine (`run`), with
N it runs on its own KV sequence through a `BatchPool`, sharing each llama_decode with the others in flight. It is
cancelled (the runtime's `should_cancel` hook) as soon as its client goes away, whether it is queued, in prefill,
judging, captioning or streaming; its slot and KV sequence are then free for the next request.

As a gateway (`ServerState.engine` is a `RemoteModel`), the same queue and slots stand in front of an
OpenAI-compatible server: each slot is one ECSO request in flight there, its steps sent one by one.

Streaming keeps ECSO's promise: in `held` mode the first answer is held back until the judge clears it, so an answer
judged unsafe never reaches the client; `live` streams it at once and, if it is judged unsafe, says so and streams
the new answer after it. `stream_options.ecso_events` adds named `ecso` SSE events with each step as it runs.

Security: the Host header must name this machine (DNS rebinding), bodies must be `application/json` (a browser page
elsewhere cannot send one without a CORS preflight, which is never granted), body/image limits, a deadline for the
body (the HTTP layer in `http.py` adds one for headers), images only from `data:` URIs unless allow-listed.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import time
import traceback
import uuid
from dataclasses import dataclass, field
from importlib import resources
from typing import Optional, Union

import anyio
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ecso.runtime import EcsoOptions, Engine, Heads
from ecso.runtime.batch import BatchPool
from ecso.runtime.remote import RemoteModel
from ecso.server.chat import ReplyIds, api_error_from, parse_chat_request
from ecso.server.exchange import LIVE_UNSAFE_NOTICE, ClientGone, Exchange, Job
from ecso.server.media import MediaPolicy
from ecso.server.schemas import ApiError, ModelCard, ModelList

__all__ = ["LIVE_UNSAFE_NOTICE", "ServerConfig", "ServerState", "RequestQueue", "QueueFull", "QueueTimeout",
           "create_app", "is_loopback"]

STREAM_MODES = ("held", "live")
log = logging.getLogger("ecso.server")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080  # 0: any free port (see EcsoServer.port)
    model_name: str = "ecso"  # the id clients see in /v1/models and in replies
    api_key: Optional[str] = None  # when set, every /v1 request needs `Authorization: Bearer <key>`
    max_body_bytes: int = 32 * 1024 * 1024  # a 20 MB image is ~27 MB as base64
    max_waiting: int = 8  # requests that may wait while every slot runs one; more are refused with 429
    queue_timeout: float = 300.0  # seconds a request may wait for the engine before a 503
    read_timeout: float = 30.0  # seconds to receive the headers, and again the body (slow clients are cut off)
    stream_mode: str = "held"
    allowed_hosts: tuple[str, ...] = ()  # extra Host header names (e.g. a LAN name when bound to 0.0.0.0)
    max_connections: int = 64  # open connections; more get an immediate 503
    max_decoding: int = 2  # requests decoding an image at once (bounds the memory of many large images)
    media: MediaPolicy = field(default_factory=MediaPolicy)
    log: bool = True  # one line per request on stderr


@dataclass
class ServerStats:
    answered: int = 0
    refused: int = 0  # 429 / 503: queue full or waited too long
    bad_requests: int = 0  # 4xx other than refusals
    cancelled: int = 0  # the client went away
    failed: int = 0  # 5xx


class QueueFull(Exception):
    pass


class QueueTimeout(Exception):
    pass


class RequestQueue:
    """FIFO admission in front of the engine's slots: up to `slots` requests run, up to `max_waiting` wait, the rest
    are refused. Lives on the event loop (asyncio.Semaphore wakes waiters in arrival order). `enter` hands each
    running request a slot number 1..slots, so replies and /health can say which slot served it."""

    def __init__(self, max_waiting: int, timeout: float, slots: int = 1):
        if slots < 1:
            raise ValueError("a queue needs at least one slot")
        self.max_waiting, self.timeout, self.slots = max_waiting, timeout, slots
        self._turn = asyncio.Semaphore(slots)
        self._free = list(range(1, slots + 1))
        self.admitted = 0  # running + waiting
        self.running = 0

    @property
    def waiting(self) -> int:
        return self.admitted - self.running

    async def enter(self) -> int:
        """Returns this request's slot when it is its turn; raises QueueFull or QueueTimeout."""
        if self.admitted >= self.slots + self.max_waiting:
            raise QueueFull()
        self.admitted += 1
        try:
            await asyncio.wait_for(self._turn.acquire(), self.timeout)
        except asyncio.TimeoutError:
            self.admitted -= 1
            raise QueueTimeout() from None
        except BaseException:
            self.admitted -= 1
            raise
        self.running += 1
        return self._free.pop(0)

    def leave(self, slot: int) -> None:
        self.running -= 1
        self.admitted -= 1
        self._free.append(slot)
        self._turn.release()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False



async def _watch_disconnect(request: Request) -> None:
    """Returns when the client has gone (after the body was read, the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class ServerState:
    engine: Union[Engine, RemoteModel]  # the model: in process, or the server this one is a gateway for
    options: EcsoOptions
    config: ServerConfig
    heads: Heads
    queue: RequestQueue
    stats: ServerStats = field(default_factory=ServerStats)
    created: int = field(default_factory=lambda: int(time.time()))
    decoding: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(2))
    jobs: set = field(default_factory=set)  # running Jobs (at most one per slot), cancelled when the server stops
    pool: Optional[BatchPool] = None  # the slots' KV sequences when the engine is loaded with parallel > 1

    @property
    def fingerprint(self) -> str:
        if isinstance(self.engine, RemoteModel):
            return f"ecso-remote-{self.engine.config.model}"
        return f"ecso-{self.engine.model_fingerprint}"

    def count(self, what: str) -> None:
        setattr(self.stats, what, getattr(self.stats, what) + 1)

    def health(self) -> dict:
        return {"status": "ok", "model": self.config.model_name,
                "queue": {"running": self.queue.running, "waiting": self.queue.waiting,
                          "max_waiting": self.queue.max_waiting},
                "slots": {"total": self.queue.slots, "busy": self.queue.running,
                          "free": self.queue.slots - self.queue.running, "batched": self.pool is not None},
                "counts": dict(vars(self.stats)), **self.backend_health()}

    def backend_health(self) -> dict:
        if isinstance(self.engine, RemoteModel):  # a gateway: the server behind it and its model
            return {"backend": {"url": self.engine.base_url, "model": self.engine.config.model}}
        return {"image_cache_entries": len(self.engine.image_cache)}


# ------------------------------------------------------------------------------------------------------ the app
def create_app(state: ServerState) -> Starlette:
    async def health(request: Request) -> Response:
        return _guarded(request, state, lambda: JSONResponse(state.health()), needs_key=False)

    async def models(request: Request) -> Response:
        cards = ModelList(data=[ModelCard(id=state.config.model_name, created=state.created)])
        return _guarded(request, state, lambda: JSONResponse(cards.model_dump()))

    async def page(request: Request) -> Response:
        return _guarded(request, state, lambda: HTMLResponse(PAGE, headers=PAGE_HEADERS), needs_key=False)

    async def chat(request: Request) -> Response:
        try:
            _check(request, state)
            return await _chat(request, state)
        except BaseException as e:  # noqa: BLE001 - every failure becomes a JSON reply; the server keeps going
            return _error_response(state, e)

    async def not_found(request: Request, exc: HTTPException) -> Response:
        known = "/, /health, /v1/models, /v1/chat/completions"
        if exc.status_code == 405:
            err = ApiError(405, f"{request.method} is not allowed on {request.url.path}", "method_not_allowed")
        else:
            err = ApiError(exc.status_code, f"no route {request.url.path}; this server has {known}", "not_found")
        return _error_response(state, err)

    routes = [Route("/", page), Route("/health", health), Route("/v1/models", models),
              Route("/v1/chat/completions", chat, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found})


PAGE = resources.files("ecso.server").joinpath("static/index.html").read_text(encoding="utf-8")
# the page needs nothing from elsewhere: no external script, style, font or connection can load
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                           "img-src data: blob:; connect-src 'self'; base-uri 'none'; "
                                           "form-action 'none'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def _guarded(request: Request, state: ServerState, respond, needs_key: bool = True) -> Response:
    try:
        _check(request, state, needs_key)
        return respond()
    except ApiError as e:
        return _error_response(state, e)


def _check(request: Request, state: ServerState, needs_key: bool = True) -> None:
    """DNS-rebinding protection (Host must name this machine) and the API key."""
    cfg = state.config
    host = (request.headers.get("host") or "").strip()
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if is_loopback(cfg.host) or cfg.allowed_hosts:
        if not (is_loopback(name) or name in cfg.allowed_hosts or name == cfg.host):
            raise ApiError(403, f"Host {host!r} is not allowed (DNS rebinding protection); start the server with "
                           "--allow-host NAME to accept it", "host_not_allowed")
    if needs_key and cfg.api_key:
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), cfg.api_key.encode()):
            raise ApiError(401, "invalid or missing API key (send Authorization: Bearer <key>)", "invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})


def _error_response(state: ServerState, e: BaseException) -> Response:
    if isinstance(e, ClientGone):
        state.count("cancelled")
        return Response(status_code=204)  # nobody is listening
    if not isinstance(e, Exception):
        raise e  # CancelledError and friends: the server is shutting down
    err = api_error_from(e)
    if err.status >= 500 and not isinstance(e, ApiError):
        log.error("unexpected error: %s", "".join(traceback.format_exception(e)))
    state.count("refused" if err.status in (429, 503) else "bad_requests" if err.status < 500 else "failed")
    headers = dict(err.headers)
    if err.status in (408, 411, 413, 415):
        headers["Connection"] = "close"  # the rest of the body (if any) is not read
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


async def _read_body(request: Request, cfg: ServerConfig) -> bytes:
    """The JSON body under the size limit and the read deadline (a trickling client is cut off)."""
    ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, not {ctype or 'missing'}",
                       "unsupported_media_type")
    limit = cfg.max_body_bytes
    declared = request.headers.get("content-length")
    too_large = declared is not None and declared.isdigit() and int(declared) > limit
    chunks, size = [], 0
    try:
        with anyio.fail_after(cfg.read_timeout):
            async for part in request.stream():
                size += len(part)
                if size > 4 * limit:
                    break  # read enough of a refused body that the client sees the 413 rather than a reset
                if not too_large and size <= limit:
                    chunks.append(part)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {cfg.read_timeout:g} s", "request_timeout")
    except ClientDisconnect:
        raise ClientGone() from None
    if too_large or size > limit:
        raise ApiError(413, f"the request body is {max(size, int(declared or 0)) / 1e6:.1f} MB, over the limit of "
                       f"{limit / 1e6:.1f} MB", "request_too_large")
    return b"".join(chunks)


async def _chat(request: Request, state: ServerState) -> Response:
    raw = await _read_body(request, state.config)
    eng = state.engine
    async with state.decoding:  # image fetch + decode off the event loop, a bounded number at once
        req = await anyio.to_thread.run_sync(parse_chat_request, raw, state.options, state.config.media,
                                             eng.config.image_limits, eng.config.max_query_chars)
    gone = asyncio.ensure_future(_watch_disconnect(request))
    streaming = False
    try:
        t0 = time.perf_counter()
        slot = await _enter_queue(state, gone)
        job = Job(state, req, slot)
        job.start()
        ids = ReplyIds("chatcmpl-" + uuid.uuid4().hex[:24], state.config.model_name, state.fingerprint)
        exchange = Exchange(state, job, ids, time.perf_counter() - t0)
        if req.stream:
            first = await exchange.first_events(gone)  # errors before the first token still get their status
            streaming = True  # from here the stream owns `gone`
            return EventSourceResponse(exchange.sse(first, gone), send_timeout=state.config.read_timeout,
                                       ping=15, headers={"Cache-Control": "no-cache"})
        return JSONResponse(await exchange.reply(gone))
    finally:
        if not streaming:
            gone.cancel()


async def _enter_queue(state: ServerState, gone: asyncio.Future) -> int:
    """This request's slot, once it has one; 429 / 503 when refused, ClientGone if the client left meanwhile."""
    enter = asyncio.ensure_future(state.queue.enter())
    await asyncio.wait({enter, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not enter.done():
        enter.cancel()
        try:
            state.queue.leave(await enter)  # got the turn just as the client left
        except (asyncio.CancelledError, QueueFull, QueueTimeout):
            pass
        raise ClientGone()
    try:
        return enter.result()
    except QueueFull:
        raise ApiError(429, f"the server is busy: all {state.queue.slots} slot(s) are running and "
                       f"{state.queue.max_waiting} requests are already waiting; retry shortly", "queue_full",
                       headers={"Retry-After": "1"}) from None
    except QueueTimeout:
        raise ApiError(503, f"waited {state.queue.timeout:.0f} s for the model without a turn; retry later",
                       "queue_timeout", headers={"Retry-After": "5"}) from None
