"""A fault injector for the remote backend's error paths: a raw-socket HTTP server on loopback that answers each
request as scripted (an HTTP error, a malformed body, silence) or forwards it to a real server (llama-server),
optionally altering the real reply. It never invents a chat completion: a successful reply always comes from the
real server behind it."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass
class Fault:
    """What the injector does with one request: `status` (an HTTP error with a JSON error body), `raw` (these
    bytes as a 200 body), `sleep` (say nothing for this long, then close), or `forward` (to the real server;
    `alter` may change its JSON reply)."""

    kind: str
    status: int = 0
    raw: bytes = b""
    seconds: float = 0.0
    alter: Optional[Callable[[dict], dict]] = None


@dataclass
class FaultInjector:
    """Serves `script` faults in order, then `then` for every later request."""

    upstream: Optional[str] = None  # the real server's base URL (…/v1) for `forward`
    script: list[Fault] = field(default_factory=list)
    then: Fault = field(default_factory=lambda: Fault("forward"))
    seen: list[str] = field(default_factory=list)  # the kind applied to each request, in order

    def __post_init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._stop = False
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}/v1"

    def close(self) -> None:
        self._stop = True
        self._sock.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            path, body = _read_request(conn)
            with self._lock:
                fault = self.script.pop(0) if self.script else self.then
                self.seen.append(fault.kind)
            if fault.kind == "sleep":
                time.sleep(fault.seconds)
                return
            if fault.kind == "status":
                _reply(conn, fault.status, json.dumps({"error": {"message": "injected failure", "code": fault.status}})
                       .encode())
            elif fault.kind == "raw":
                _reply(conn, 200, fault.raw)
            else:
                assert self.upstream, "forward needs an upstream server"
                request = urllib.request.Request(self.upstream.removesuffix("/v1") + path, data=body, method="POST",
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=600) as r:
                    reply = json.loads(r.read())
                if fault.alter is not None:
                    reply = fault.alter(reply)
                _reply(conn, 200, json.dumps(reply).encode())


def _read_request(conn: socket.socket) -> tuple[str, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return "", b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    path = lines[0].split(" ")[1]
    length = next((int(x.split(":", 1)[1]) for x in lines[1:] if x.lower().startswith("content-length:")), 0)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return path, body


def _reply(conn: socket.socket, status: int, body: bytes) -> None:
    head = (f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    try:
        conn.sendall(head + body)
    except OSError:
        pass
