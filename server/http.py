"""`EcsoServer`: the app on uvicorn, on a socket bound before it starts (so port 0 works and bind errors are one line).

uvicorn itself never times out a client that trickles its request headers, and its connection limit answers with
plain text. `GuardedH11Protocol` (uvicorn's h11 protocol plus two checks) closes a connection whose request headers
have not all arrived within `read_timeout` (a 408), and refuses connections beyond `max_connections` with an
OpenAI-style JSON 503. The body has its own deadline in the app; slow readers of a stream hit sse-starlette's send
timeout. None of these waits holds a thread or the model: they are coroutines on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Optional, Union

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ecso.runtime import EcsoOptions, Engine, Heads
from ecso.runtime.batch import BatchPool
from ecso.runtime.errors import InputError
from ecso.runtime.remote import RemoteModel
from ecso.server.app import STREAM_MODES, RequestQueue, ServerConfig, ServerState, create_app, is_loopback
from ecso.server.schemas import ApiError


def _raw_reply(status: str, err: ApiError) -> bytes:
    body = json.dumps(err.body())
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n{body}").encode()


_BUSY = _raw_reply("503 Service Unavailable",
                   ApiError(503, "too many open connections; retry shortly", "too_many_connections"))


def guarded_protocol(read_timeout: float, max_connections: int) -> type:
    """uvicorn's h11 protocol with a deadline for request headers and a JSON 503 beyond the connection limit."""
    too_slow = _raw_reply("408 Request Timeout", ApiError(
        408, f"the request headers did not arrive within {read_timeout:g} s", "request_timeout"))

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._deadline: Optional[asyncio.TimerHandle] = None
            self._served = None  # the request cycle the deadline was armed after
            if len(self.connections) > max_connections:
                transport.write(_BUSY)
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._served = self.cycle
            self._deadline = self.loop.call_later(read_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _headers_too_slow(self) -> None:
            self._deadline = None
            if not self.transport.is_closing() and self.cycle is self._served:
                self.transport.write(too_slow)
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if self._deadline is not None and self.cycle is not self._served:
                self._disarm()  # a new request's headers are complete

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # keep-alive: the next request's headers get the same deadline

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol


class EcsoServer:
    """Serves one Engine, with as many slots (requests running at once) as the engine's `parallel`; or, as a
    gateway, a RemoteModel (an OpenAI-compatible server), with `RemoteConfig.parallel` requests in flight there.
    `start()` runs it in a background thread (tests, apps); `serve_forever()` blocks.

        with EcsoServer(engine, EcsoOptions(max_tokens=256), ServerConfig(port=0)).start() as server:
            print(server.url)  # http://127.0.0.1:PORT/v1
    """

    def __init__(self, engine: Union[Engine, RemoteModel], options: EcsoOptions = EcsoOptions(),
                 config: ServerConfig = ServerConfig(), heads: Heads = Heads()):
        if config.stream_mode not in STREAM_MODES:
            raise InputError(f"unknown stream mode {config.stream_mode!r}; use held or live")
        if not is_loopback(config.host) and not config.api_key:
            raise InputError(f"refusing to listen on {config.host} without an API key: anyone on the network could "
                             "use the model; pass --api-key (or ECSO_API_KEY), or bind 127.0.0.1")
        options.validate()
        self.config = config
        slots = engine.config.parallel  # one slot per KV sequence the engine was loaded with (remote: in flight)
        self.state = ServerState(engine, options, config, heads,
                                 RequestQueue(config.max_waiting, config.queue_timeout, slots),
                                 decoding=asyncio.Semaphore(max(1, config.max_decoding)))
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((config.host, config.port))
            self._sock.listen(128)  # a burst of clients is queued by the kernel, not reset
        except OSError as e:
            self._sock.close()
            raise InputError(f"cannot listen on {config.host}:{config.port} ({e.strerror or e}); "
                             "pick another --port") from None
        if slots > 1 and isinstance(engine, Engine):  # after the bind: no scheduler thread left by a failed start
            self.state.pool = BatchPool(engine)
        uv = uvicorn.Config(create_app(self.state), http=guarded_protocol(config.read_timeout, config.max_connections),
                            lifespan="off", access_log=config.log, log_level="info" if config.log else "warning",
                            timeout_keep_alive=5, timeout_graceful_shutdown=5, server_header=False)
        self._server = uvicorn.Server(uv)
        self._thread: Optional[threading.Thread] = None

    @property
    def queue(self) -> RequestQueue:
        return self.state.queue

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1]

    @property
    def url(self) -> str:
        host = self.config.host if ":" not in self.config.host else f"[{self.config.host}]"
        return f"http://{host}:{self.port}/v1"

    def health(self) -> dict:
        return self.state.health()

    def start(self, timeout: float = 30) -> "EcsoServer":
        self._thread = threading.Thread(target=self.serve_forever, name="ecso-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def serve_forever(self) -> None:
        """Blocks until SIGINT/SIGTERM (on the main thread) or `close()`; a request still running is cancelled, so
        the engine is free when this returns (or soon after: at its next decode batch)."""
        try:
            self._server.run(sockets=[self._sock])
        finally:
            for job in list(self.state.jobs):
                job.cancel()

    def close(self) -> None:
        """Stops accepting requests, closes the socket and (with slots) the batch pool, once its requests have
        stopped; the engine is the caller's."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        self._sock.close()
        pool, self.state.pool = self.state.pool, None
        if pool is not None:
            for job in list(self.state.jobs):
                job.cancel()
            pool.close()

    def __enter__(self) -> "EcsoServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

