"""Slow clients cannot hold the model or the server: a client that trickles its headers or its body is cut off with
a 408 after the read timeout, never reaches the request queue, and while several of them trickle, ordinary requests
are answered at once (real server, real demo model)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from ecso.runtime import EcsoOptions
from ecso.server import EcsoServer, ServerConfig
from support.reliability import request

READ_TIMEOUT = 6.0
HI = {"messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 4}


@pytest.fixture(scope="module")
def server(demo_files):
    from ecso.runtime import Engine, EngineConfig

    with Engine(EngineConfig(model=demo_files[0], mmproj=demo_files[1], n_ctx=1024, n_threads=1)) as engine:
        config = ServerConfig(port=0, model_name="demo", log=False, read_timeout=READ_TIMEOUT, max_connections=12)
        with EcsoServer(engine, EcsoOptions(max_tokens=4), config).start() as s:
            yield s


class Trickler(threading.Thread):
    """Sends `head` at once, then `tail` one byte every `gap` seconds; records what the server answered and when."""

    def __init__(self, port: int, head: bytes, tail: bytes, gap: float = 0.2):
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.head, self.tail, self.gap = head, tail, gap
        self.reply = b""
        self.t0 = time.monotonic()
        self.seconds = 0.0

    def run(self) -> None:
        try:
            self.sock.sendall(self.head)
            for i in range(len(self.tail)):
                self.sock.sendall(self.tail[i:i + 1])
                time.sleep(self.gap)
        except OSError:  # the server cut us off: expected
            pass
        try:
            self.reply = self.sock.recv(4096)
        except OSError:
            pass
        self.seconds = time.monotonic() - self.t0
        self.sock.close()


def _slow_headers(port: int) -> Trickler:
    return Trickler(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"X-Slow: " + b"a" * 200)


def _slow_body(port: int) -> Trickler:
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 400\r\n\r\n")
    return Trickler(port, head, b'{"messages": [' + b" " * 380)


def test_trickling_clients_get_408_and_never_hold_the_model_or_the_server(server):
    before = server.health()["counts"]
    slow = [_slow_headers(server.port) for _ in range(4)] + [_slow_body(server.port) for _ in range(4)]
    for t in slow:
        t.start()
    time.sleep(0.5)  # all eight are trickling now
    r = request(server.port, "POST", "/v1/chat/completions", HI)
    assert r.status == 200 and isinstance(r.json()["choices"][0]["message"]["content"], str)
    assert r.json()["usage"]["completion_tokens"] > 0  # answered by the model, not an error body
    assert all(t.is_alive() for t in slow), "the answer came only after the slow clients were cut off"
    deadline = time.monotonic() + 2  # the worker hands the engine back just after the reply went out
    while server.health()["queue"]["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    queue = server.health()["queue"]
    assert queue["running"] == 0 and queue["waiting"] == 0  # no slow client reached the queue
    assert all(t.is_alive() for t in slow)
    for t in slow:
        t.join(READ_TIMEOUT + 10)
        assert not t.is_alive()
        assert t.reply.startswith(b"HTTP/1.1 408"), t.reply[:80]
        assert b"request_timeout" in t.reply
        assert t.seconds < READ_TIMEOUT + 3  # cut off at the deadline, not when the client finished
    after = server.health()["counts"]
    assert after["answered"] == before["answered"] + 1 and after["failed"] == 0


def test_slow_clients_free_their_connection_slots(server):
    """Twelve slots; twelve idle clients that never finish their headers are cut off, then the slots are free."""
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(12)]
    time.sleep(0.3)
    r = request(server.port, "GET", "/health")
    assert r.status == 503 and r.json()["error"]["code"] == "too_many_connections"
    for s in idle:
        s.settimeout(READ_TIMEOUT + 5)
        assert s.recv(4096).startswith(b"HTTP/1.1 408")
        s.close()
    deadline = time.monotonic() + 5
    while request(server.port, "GET", "/health").status != 200:
        assert time.monotonic() < deadline, "slots were not released when the idle clients were cut off"
        time.sleep(0.05)
    assert request(server.port, "POST", "/v1/chat/completions", HI).status == 200
