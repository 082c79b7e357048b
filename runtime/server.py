"""A local OpenAI-compatible server with ECSO: `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`.

Standard library only (http.server). One model serves one request at a time: requests wait in a bounded FIFO queue
in front of the engine; when it is full they are refused at once with 429, and a request that waited longer than the
queue timeout gets 503. A client that goes away (while queued, generating, or streaming) is noticed at the next
token and frees the engine.

Streaming keeps ECSO's promise: in the default `held` mode the first answer is held back until the judge clears it,
so an answer judged unsafe never reaches the client; only the regenerated (eyes-closed) answer streams. `live` mode
streams the first answer as it is generated and, if it is judged unsafe, says so and streams the new answer after it.

Security: binds 127.0.0.1 by default (a non-loopback address needs an API key); the Host header must name this
machine (stops DNS rebinding); only `application/json` bodies (a browser page cannot send one cross-origin without a
CORS preflight, which is never granted); body and image size limits; images only from `data:` URIs unless a
directory or domain allow-list is given.
"""

from __future__ import annotations

import hmac
import http.server
import ipaddress
import json
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from ecso.runtime import openai_api as api
from ecso.runtime.ecso import EcsoOptions, Heads, Result, StepEvent, stream
from ecso.runtime.engine import Engine
from ecso.runtime.errors import EcsoError, InputError

LIVE_UNSAFE_NOTICE = "\n\n[ecso: the answer above was judged unsafe; answering again without the image]\n\n"
STREAM_MODES = ("held", "live")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080  # 0: any free port (see EcsoServer.port)
    model_name: str = "ecso"  # the id clients see in /v1/models and in replies
    api_key: Optional[str] = None  # when set, every /v1 request needs `Authorization: Bearer <key>`
    max_body_bytes: int = 32 * 1024 * 1024  # a 20 MB image is ~27 MB as base64
    max_waiting: int = 8  # requests that may wait while one runs; more are refused with 429
    queue_timeout: float = 300.0  # seconds a request may wait for the engine before a 503
    read_timeout: float = 30.0  # seconds to receive headers and body (slow clients cannot hold a thread forever)
    stream_mode: str = "held"
    allowed_hosts: tuple[str, ...] = ()  # extra Host header names (e.g. a LAN name when bound to 0.0.0.0)
    max_connections: int = 64  # open connections (one thread each); more get an immediate 503
    max_decoding: int = 2  # requests decoding an image at once (bounds the memory of many large images)
    media: api.MediaPolicy = field(default_factory=api.MediaPolicy)
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


class ClientGone(Exception):
    pass


class RequestQueue:
    """FIFO admission in front of the engine: one request runs, up to `max_waiting` wait, the rest are refused."""

    def __init__(self, max_waiting: int, timeout: float):
        self.max_waiting, self.timeout = max_waiting, timeout
        self._cond = threading.Condition()
        self._waiting: deque[object] = deque()
        self.running = 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def enter(self, gone: Callable[[], bool] = lambda: False) -> None:
        """Blocks until it is this request's turn; raises QueueFull, QueueTimeout or ClientGone."""
        ticket = object()
        with self._cond:
            if self.running + len(self._waiting) > self.max_waiting:
                raise QueueFull()
            self._waiting.append(ticket)
            deadline = time.monotonic() + self.timeout
            try:
                while self.running or self._waiting[0] is not ticket:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise QueueTimeout()
                    self._cond.wait(min(0.2, left))
                    if gone():
                        raise ClientGone()
            except BaseException:
                self._waiting.remove(ticket)
                self._cond.notify_all()
                raise
            self._waiting.popleft()
            self.running = 1

    def leave(self) -> None:
        with self._cond:
            self.running = 0
            self._cond.notify_all()


def client_gone(sock: socket.socket) -> bool:
    """True when the peer closed or reset the connection (it sends nothing while waiting for our reply)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class EcsoServer:
    """Serves one Engine over HTTP. `start()` runs it in a background thread (tests, apps); `serve_forever()` blocks.

        with EcsoServer(engine, EcsoOptions(max_tokens=256), ServerConfig(port=0)).start() as server:
            print(server.url)  # http://127.0.0.1:PORT/v1
    """

    def __init__(self, engine: Engine, options: EcsoOptions = EcsoOptions(), config: ServerConfig = ServerConfig(),
                 heads: Heads = Heads()):
        if config.stream_mode not in STREAM_MODES:
            raise InputError(f"unknown stream mode {config.stream_mode!r}; use held or live")
        if not is_loopback(config.host) and not config.api_key:
            raise InputError(f"refusing to listen on {config.host} without an API key: anyone on the network could "
                             "use the model; pass --api-key (or ECSO_API_KEY), or bind 127.0.0.1")
        options.validate()
        self.engine, self.options, self.config, self.heads = engine, options, config, heads
        self.queue = RequestQueue(config.max_waiting, config.queue_timeout)
        self.decoding = threading.BoundedSemaphore(max(1, config.max_decoding))
        self.stats = ServerStats()
        self._stats_lock = threading.Lock()
        self.created = int(time.time())
        self.fingerprint = f"ecso-{engine.model_fingerprint}"
        self._thread: Optional[threading.Thread] = None
        try:
            self.httpd = _HTTPServer((config.host, config.port), _Handler, config.max_connections)
        except OSError as e:
            raise InputError(f"cannot listen on {config.host}:{config.port} ({e.strerror or e}); "
                             "pick another --port") from None
        self.httpd.app = self

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        host = self.config.host if ":" not in self.config.host else f"[{self.config.host}]"
        return f"http://{host}:{self.port}/v1"

    def count(self, what: str) -> None:
        with self._stats_lock:
            setattr(self.stats, what, getattr(self.stats, what) + 1)

    def start(self) -> "EcsoServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="ecso-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def close(self) -> None:
        """Stops accepting requests and closes the socket (the engine is the caller's)."""
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
            self._thread = None
        self.httpd.server_close()

    def __enter__(self) -> "EcsoServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def health(self) -> dict:
        return {"status": "ok", "model": self.config.model_name,
                "queue": {"running": self.queue.running, "waiting": self.queue.waiting,
                          "max_waiting": self.queue.max_waiting},
                "counts": dict(vars(self.stats)), "image_cache_entries": len(self.engine.image_cache)}


_BUSY = json.dumps(api.ApiError(503, "too many open connections; retry shortly", "too_many_connections").body())
_BUSY_REPLY = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(_BUSY)}"
               f"\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{_BUSY}").encode()


class _HTTPServer(http.server.ThreadingHTTPServer):
    """One thread per connection, at most `max_connections` of them."""

    daemon_threads = True
    request_queue_size = 128  # listen backlog: a burst of clients is queued by the kernel, not reset
    app: EcsoServer

    def __init__(self, address, handler, max_connections: int):
        self._slots = threading.BoundedSemaphore(max(1, max_connections))
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(_BUSY_REPLY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ecso"
    sys_version = ""
    server: _HTTPServer

    def setup(self) -> None:
        self.timeout = self.server.app.config.read_timeout
        super().setup()

    # ----------------------------------------------------------------------------------------------- routing
    def do_GET(self) -> None:
        self._route({"/health": self._health, "/v1/models": self._models})

    def do_POST(self) -> None:
        self._route({"/v1/chat/completions": self._chat})

    def _route(self, routes: dict[str, Callable[[], None]]) -> None:
        app = self.server.app
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            self._check_host()
            handler = routes.get(path)
            if handler is None:
                known = ("/health", "/v1/models", "/v1/chat/completions")
                if path in known:
                    raise api.ApiError(405, f"{self.command} is not allowed on {path}", "method_not_allowed")
                raise api.ApiError(404, f"no route {path}; this server has {', '.join(known)}", "not_found")
            if path != "/health":
                self._check_key()
            handler()
        except api.ApiError as e:
            app.count("refused" if e.status in (429, 503) else "bad_requests" if e.status < 500 else "failed")
            self._send_error(e)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True
        except EcsoError as e:  # the runtime refused the request (e.g. longer than the context) or failed cleanly
            err = api.api_error_from(e)
            app.count("bad_requests" if err.status < 500 else "failed")
            self._send_error(err)
        except Exception as e:  # anything unexpected: a 500, a traceback in the log, and the server keeps going
            app.count("failed")
            traceback.print_exc(file=sys.stderr)
            self._send_error(api.api_error_from(e))

    def do_OTHER(self) -> None:
        self._route({})  # 404 / 405 as JSON; CORS preflights (OPTIONS) are never granted

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_OTHER

    def _check_host(self) -> None:
        app = self.server.app
        host = (self.headers.get("Host") or "").strip()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if is_loopback(app.config.host) or app.config.allowed_hosts:
            ok = is_loopback(name) or name in app.config.allowed_hosts or name == app.config.host
            if not ok:
                raise api.ApiError(403, f"Host {host!r} is not allowed (DNS rebinding protection); start the server "
                                   "with --allow-host NAME to accept it", "host_not_allowed")

    def _check_key(self) -> None:
        key = self.server.app.config.api_key
        if not key:
            return
        given = self.headers.get("Authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise api.ApiError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                               "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    # ----------------------------------------------------------------------------------------------- plumbing
    def _send_json(self, status: int, body: dict, headers: Optional[dict] = None) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, e: api.ApiError) -> None:
        try:
            self._send_json(e.status, e.body(), e.headers)
        except OSError:
            self.close_connection = True

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - BaseHTTPRequestHandler's signature
        if self.server.app.config.log:
            sys.stderr.write(f"ecso-serve {self.address_string()} {format % args}\n")

    def _read_json(self) -> object:
        app = self.server.app
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            self.close_connection = True
            raise api.ApiError(415, f"Content-Type must be application/json, not {ctype or 'missing'}",
                               "unsupported_media_type")
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise api.ApiError(411, "chunked bodies are not supported; send Content-Length", "length_required")
        try:
            length = int(self.headers.get("Content-Length", ""))
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise api.ApiError(411, "a valid Content-Length header is required", "length_required") from None
        if length > app.config.max_body_bytes:
            self.close_connection = True
            self._discard(length)
            raise api.ApiError(413, f"the request body is {length / 1e6:.1f} MB, over the limit of "
                               f"{app.config.max_body_bytes / 1e6:.1f} MB", "request_too_large")
        raw = self.rfile.read(length)
        if len(raw) < length:
            self.close_connection = True
            raise api.ApiError(400, "the request body ended early", "truncated_body")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise api.ApiError(400, f"the request body is not valid JSON ({e})", "invalid_json") from None
        except RecursionError:
            raise api.ApiError(400, "the request body is nested too deeply", "invalid_json") from None

    def _discard(self, length: int) -> None:
        """Reads and drops a refused body (up to 4x the limit), so the client gets the 413 rather than a reset."""
        left = min(length, 4 * self.server.app.config.max_body_bytes)
        while left > 0:
            part = self.rfile.read(min(left, 1 << 16))
            if not part:
                break
            left -= len(part)

    # ----------------------------------------------------------------------------------------------- endpoints
    def _health(self) -> None:
        self._send_json(200, self.server.app.health())

    def _models(self) -> None:
        app = self.server.app
        self._send_json(200, api.models_list(app.config.model_name, app.created))

    def _chat(self) -> None:
        app = self.server.app
        body = self._read_json()
        eng = app.engine
        with app.decoding:
            req = api.parse_chat_request(body, app.options, app.config.media, eng.config.image_limits,
                                         eng.config.max_query_chars)
        gone = lambda: client_gone(self.connection)  # noqa: E731
        t0 = time.perf_counter()
        try:
            app.queue.enter(gone)
        except QueueFull:
            raise api.ApiError(429, f"the server is busy: {app.queue.max_waiting} requests are already waiting; "
                               "retry shortly", "queue_full", headers={"Retry-After": "1"}) from None
        except QueueTimeout:
            raise api.ApiError(503, f"waited {app.queue.timeout:.0f} s for the model without a turn; retry later",
                               "queue_timeout", headers={"Retry-After": "5"}) from None
        except ClientGone:
            app.count("cancelled")
            self.close_connection = True
            return
        try:
            events = stream(eng, req.image, req.query, req.options, app.heads, req.history)
            exchange = _Exchange(self, req, time.perf_counter() - t0)
            try:
                if req.stream:
                    exchange.stream(events, gone)
                else:
                    exchange.reply(events, gone)
            finally:
                events.close()  # a client that left cancels the request at its next event
        finally:
            app.queue.leave()


class _Exchange:
    """One chat completion: turns ECSO StepEvents into a JSON reply or an SSE stream."""

    def __init__(self, handler: _Handler, req: api.ChatRequest, queue_seconds: float):
        self.h, self.req, self.queue_seconds = handler, req, queue_seconds
        self.app = handler.server.app
        self.rid = "chatcmpl-" + uuid.uuid4().hex[:24]
        self.headers_sent = False

    def _result(self, events: Iterator[StepEvent], gone: Callable[[], bool],
                on_event: Callable[[StepEvent], None] = lambda ev: None) -> Optional[Result]:
        for ev in events:
            if gone():
                self.app.count("cancelled")
                self.h.close_connection = True
                return None
            on_event(ev)
            if ev.kind == "result":
                return ev.result
        raise api.ApiError(500, "the ECSO request ended without a result", "engine_error")

    def reply(self, events: Iterator[StepEvent], gone: Callable[[], bool]) -> None:
        result = self._result(events, gone)
        if result is None:
            return
        app = self.app
        ecso = api.ecso_summary(result, self.queue_seconds, self.req.turns_dropped)
        self.h._send_json(200, api.completion(self.rid, app.config.model_name, app.fingerprint, result, ecso))
        app.count("answered")

    # --- SSE -------------------------------------------------------------------------------------------------
    def _send(self, obj: object) -> None:
        if not self.headers_sent:  # lazily: an error before the first token still gets a proper status code
            h = self.h
            h.close_connection = True
            h.send_response(200)
            h.send_header("Content-Type", "text/event-stream")
            h.send_header("Cache-Control", "no-cache")
            h.send_header("Connection", "close")
            h.end_headers()
            self.headers_sent = True
            self._send(self._chunk({"role": "assistant", "content": ""}))
        data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
        self.h.wfile.write(f"data: {data}\n\n".encode())
        self.h.wfile.flush()

    def _chunk(self, delta: Optional[dict], finish: Optional[str] = None, **extra) -> dict:
        return api.chunk(self.rid, self.app.config.model_name, self.app.fingerprint, delta, finish, **extra)

    def stream(self, events: Iterator[StepEvent], gone: Callable[[], bool]) -> None:
        text = _StreamText(self.app.config.stream_mode == "live" or not self.req.options.defense)

        def on_event(ev: StepEvent) -> None:
            for delta in text.feed(ev):
                self._send(self._chunk({"content": delta}))

        try:
            result = self._result(events, gone, on_event)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.app.count("cancelled")
            self.h.close_connection = True
            return
        except Exception as e:
            if not self.headers_sent:
                raise
            err = api.api_error_from(e)  # headers are out: the error goes in the stream (openai raises APIError)
            self.app.count("failed" if err.status >= 500 else "bad_requests")
            self._send(err.body())
            return
        if result is None:
            return
        ecso = api.ecso_summary(result, self.queue_seconds, self.req.turns_dropped)
        self._send(self._chunk({}, api.finish_reason(result), ecso=ecso))
        if self.req.include_usage:
            self._send(self._chunk(None, usage=api.usage(result)))
        self._send("[DONE]")
        self.app.count("answered")


class _StreamText:
    """Which text reaches a streaming client. Held: the first answer only once the judge cleared it; the
    regenerated answer as it comes. Live: everything as it comes, with a notice before a regenerated answer."""

    def __init__(self, live: bool):
        self.live = live
        self.held: list[str] = []
        self.started = False  # leading whitespace of the answer is dropped, as in non-streaming replies
        self.noticed = False

    def feed(self, ev: StepEvent) -> list[str]:
        if ev.kind == "token" and ev.step == "answer":
            if self.live:
                return self._text(ev.text)
            self.held.append(ev.text)
            return []
        if (ev.kind == "step_start" and ev.step in ("caption", "regenerate")) or ev.kind == "retract":
            self.held.clear()  # judged unsafe: the first answer is never sent
            if self.live and self.started and not self.noticed:
                self.noticed, self.started = True, False
                return [LIVE_UNSAFE_NOTICE]
            return []
        if ev.kind == "token" and ev.step == "regenerate":
            return self._text(ev.text)
        if ev.kind == "result" and not self.live and not ev.result.unsafe and ev.result.answer:
            return [ev.result.answer]
        return []

    def _text(self, delta: str) -> list[str]:
        if not self.started:
            delta = delta.lstrip()
            if not delta:
                return []
            self.started = True
        return [delta]
