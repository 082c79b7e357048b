"""Reliability figures for `ecso serve`, the CLI and the Python API: bad inputs, load, memory over a soak.

Loopback only, bounded in count and time. `python bench/soak.py` runs everything and prints the figures; the tests
run the same cases (tests/test_bad_inputs.py, tests/test_server_load.py), with a shorter soak.

- Bad inputs: every case must get a clear one-line error with the right exit code (CLI), exception type (API) or
  status code and OpenAI-style JSON (server), and the server must still answer /health afterwards.
- Load: N clients at once; every request is answered (200) or cleanly refused (429/503 with a JSON error).
- Soak: sequential requests (text, image, streaming) against one server process; its RSS after a warm-up that fills
  the caches must stay flat (no KV, image-cache or thread leak).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

from tqdm import tqdm

SERVE = [sys.executable, "-c", "from ecso.cli.main import main; main()", "serve"]
RUN = [sys.executable, "-c", "from ecso.cli.run import main; main()"]
OVERLONG_QUERY = "why " * 5000  # ~5000 tokens: over a 2048-token context, under the 100k-character query limit


# ------------------------------------------------------------------------------------------------ bad payloads
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def crafted_png(width: int, height: int, idat: bytes, color_type: int = 0, bit_depth: int = 8) -> bytes:
    """A PNG written chunk by chunk: the header declares any size, the IDAT holds whatever bytes are given."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def good_png(seed: int = 0, size: tuple[int, int] = (96, 72)) -> bytes:
    """A small valid noise PNG; different seeds give different pixels (distinct image-cache entries)."""
    from PIL import Image

    rng = random.Random(seed)
    img = Image.frombytes("RGB", size, bytes(rng.getrandbits(8) for _ in range(size[0] * size[1] * 3)))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def bad_images() -> dict[str, bytes]:
    """Images that must be refused before they reach llama.cpp. The bomb is 17 KB that would decode to 144 MP."""
    valid = good_png(1)
    side = 12000
    bomb_rows = (b"\x00" + b"\x00" * (side // 8)) * side
    return {
        "corrupt image": crafted_png(64, 64, bytes(random.Random(7).getrandbits(8) for _ in range(600))),
        "empty image": b"",
        "non-image": b"this is a text file, not a picture\n",
        "truncated image": valid[: len(valid) // 2],
        "decompression bomb": crafted_png(side, side, zlib.compress(bomb_rows, 9), bit_depth=1),
        "huge dimensions": crafted_png(20000, 100, zlib.compress(b"\x00" * 10)),
    }


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@dataclass(frozen=True)
class BadModels:
    truncated: Path  # the demo GGUF cut in half
    not_gguf: Path
    foreign_mmproj: Path  # a real projector, for a 64-dim LLM


def bad_models(workdir: Path, llm: str) -> BadModels:
    from ecso.export.gguf_write import VisionParams, write_mmproj
    from ecso.models.demo import demo_tower_weights

    workdir.mkdir(parents=True, exist_ok=True)
    truncated, not_gguf, foreign = workdir / "truncated.gguf", workdir / "not-a-model.gguf", workdir / "foreign.gguf"
    size = Path(llm).stat().st_size
    with open(llm, "rb") as f:
        truncated.write_bytes(f.read(size // 2))
    not_gguf.write_bytes(b"PK\x03\x04 this is a zip, not a GGUF model" + bytes(4096))
    import numpy as np

    w = demo_tower_weights(224)
    rng = np.random.Generator(np.random.PCG64(64))
    w["projector.linear_1.weight"] = rng.standard_normal((64, 32)).astype(np.float32) * 0.1
    w["projector.linear_1.bias"] = np.zeros(64, np.float32)
    w["projector.linear_2.weight"] = rng.standard_normal((64, 64)).astype(np.float32) * 0.1
    w["projector.linear_2.bias"] = np.zeros(64, np.float32)
    vp = VisionParams(image_size=224, patch_size=14, hidden=32, ffn=48, heads=2, layers=2, feature_layer=-2,
                      projection_dim=64, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), use_gelu=False,
                      name="projector of another model")
    write_mmproj(foreign, vp, w.__getitem__, w.__contains__, outtype="f32")
    return BadModels(truncated, not_gguf, foreign)


# ------------------------------------------------------------------------------------------------ the server
class ServerProcess:
    """`ecso serve` in a child process on a free loopback port; `rss()` reads its resident memory."""

    def __init__(self, args: list[str], api_key: str = "", start_timeout: float = 120):
        env = dict(os.environ)
        if api_key:
            env["ECSO_API_KEY"] = api_key
        self.api_key = api_key
        self.proc = subprocess.Popen(SERVE + ["--host", "127.0.0.1", "--port", "0", "--quiet", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = _readline(self.proc, start_timeout)
        if "serving" not in line:
            self.stop()
            raise RuntimeError(f"ecso serve did not start: {line!r} {self.proc.stderr.read()[-2000:]}")
        self.port = int(line.split("127.0.0.1:")[1].split("/")[0])

    def rss(self) -> int:
        return rss_bytes(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            f.close()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return out[0] if out else ""


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc; 0 where unavailable)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class Reply:
    status: int
    body: bytes
    headers: Mapping[str, str]

    def json(self) -> dict:
        try:
            return json.loads(self.body)
        except ValueError:
            return {}

    @property
    def error(self) -> str:
        err = self.json().get("error") if isinstance(self.json(), dict) else None
        return err.get("message", "") if isinstance(err, dict) else ""


def request(port: int, method: str, path: str, body: object = None, *, api_key: str = "", raw: Optional[bytes] = None,
            headers: Optional[dict] = None, timeout: float = 600) -> Reply:
    """One HTTP request on a fresh loopback connection (stdlib only, like a minimal client)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        h = {"Content-Type": "application/json"} if data is not None else {}
        if api_key:
            h["Authorization"] = f"Bearer {api_key}"
        h.update(headers or {})
        conn.request(method, path, body=data, headers=h)
        r = conn.getresponse()
        return Reply(r.status, r.read(), r.headers)  # case-insensitive names
    finally:
        conn.close()


def open_chat_request(port: int, body: dict) -> socket.socket:
    """Sends a chat completion on a raw socket and returns it unread, so a test can walk away mid-request."""
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=120)
    s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def chat_body(query: str, image: Optional[bytes] = None, max_tokens: int = 8, stream: bool = False,
              image_url: Optional[str] = None, **extra) -> dict:
    content: object = query
    url = image_url or (data_uri(image) if image is not None else None)
    if url is not None:
        content = [{"type": "text", "text": query}, {"type": "image_url", "image_url": {"url": url}}]
    return {"model": "any", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "stream": stream, **extra}


# ------------------------------------------------------------------------------------------------ bad inputs
@dataclass
class Outcome:
    surface: str  # server | cli | api
    case: str
    passed: bool
    detail: str


def _check(surface: str, case: str, fn: Callable[[], str]) -> Outcome:
    """Runs one case; `fn` returns "" when the behaviour was right, else what went wrong."""
    try:
        problem = fn()
    except Exception as e:  # a crash of the case itself is a failed case, reported, not raised
        problem = f"{type(e).__name__}: {e}"
    return Outcome(surface, case, not problem, problem or "ok")


def server_cases(server: ServerProcess, max_image_bytes: int, max_body_bytes: int) -> Iterator[Outcome]:
    """Each case: the expected status with an OpenAI-style error message, then /health still answers."""
    port, key = server.port, server.api_key
    post = lambda body=None, **kw: request(port, "POST", "/v1/chat/completions", body, api_key=key, **kw)  # noqa: E731

    def expect(reply: Reply, status: int, text: str = "") -> str:
        if reply.status != status or not reply.error or text.lower() not in reply.error.lower():
            return f"got {reply.status} {reply.body[:200]!r}, expected {status} with {text!r}"
        health = request(port, "GET", "/health")
        return "" if health.status == 200 and server.alive() else "the server stopped answering /health"

    cases: dict[str, Callable[[], str]] = {
        f"{name} -> 400": (lambda data=data: expect(post(chat_body("What is this?", data)), 400))
        for name, data in bad_images().items()
    }
    cases.update({
        "image over the size limit -> 413": lambda: expect(post(chat_body("hi", os.urandom(max_image_bytes + 1))), 413),
        "body over the size limit -> 413": lambda: expect(post(raw=b" " * (max_body_bytes + 1)), 413),
        "empty query -> 400": lambda: expect(post(chat_body("   ")), 400, "empty"),
        "query longer than the context -> 400": lambda: expect(post(chat_body(OVERLONG_QUERY)), 400, "context"),
        "invalid JSON -> 400": lambda: expect(post(raw=b'{"messages": [}'), 400, "JSON"),
        "JSON nested 100000 deep -> 400": lambda: expect(post(raw=b"[" * 100_000), 400, "nested"),
        "JSON that is not an object -> 400": lambda: expect(post([1, 2]), 400, "object"),
        "wrong content type -> 415": lambda: expect(post(raw=b"hello", headers={"Content-Type": "text/plain"}), 415),
        "no messages -> 400": lambda: expect(post({"model": "x"}), 400, "messages"),
        "last message not from the user -> 400": lambda: expect(
            post({"messages": [{"role": "assistant", "content": "hi"}]}), 400, "user"),
        "unsupported content part -> 400": lambda: expect(post({"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]}), 400, "unsupported"),
        "invalid base64 image -> 400": lambda: expect(post(chat_body("hi", image_url="data:image/png;base64,@@@")),
                                                      400, "base64"),
        "remote image URL refused -> 400": lambda: expect(post(chat_body(
            "hi", image_url="http://169.254.169.254/latest/meta-data")), 400, "refused"),
        "file:// image URL refused -> 400": lambda: expect(post(chat_body("hi", image_url="file:///etc/passwd")),
                                                           400, "refused"),
        "negative max_tokens -> 400": lambda: expect(post(chat_body("hi", max_tokens=-1)), 400, "max_tokens"),
        "stop sequences -> 400": lambda: expect(post(chat_body("hi", stop=["\n"])), 400, "stop"),
        "unknown ECSO option -> 400": lambda: expect(post(chat_body("hi", ecso={"nope": 1})), 400, "unknown"),
        "foreign Host header -> 403": lambda: expect(request(port, "GET", "/v1/models", api_key=key,
                                                             headers={"Host": "attacker.example:80"}), 403, "Host"),
        "unknown route -> 404": lambda: expect(request(port, "GET", "/v2/nothing", api_key=key), 404),
        "wrong method -> 405": lambda: expect(request(port, "GET", "/v1/chat/completions", api_key=key), 405),
        "body shorter than Content-Length": lambda: _short_body(port, key),
        "client disconnects mid-request frees the engine": lambda: _disconnect(port, key),
    })
    if key:
        cases["missing API key -> 401"] = lambda: expect(request(port, "GET", "/v1/models"), 401, "API key")
        cases["wrong API key -> 401"] = lambda: expect(request(port, "GET", "/v1/models", api_key=key + "x"), 401)
    for name, fn in cases.items():
        yield _check("server", name, fn)
    yield _check("server", "a good request is answered after all of the above",
                 lambda: "" if post(chat_body("Say hello.", good_png(3))).status == 200 else "not answered")


def _short_body(port: int, key: str) -> str:
    """A body that ends early (the client half-closes): uvicorn closes such a connection at once (no reply can be
    sent to it); nothing reaches the model, the request counts as cancelled and the server keeps serving."""
    import socket

    before = request(port, "GET", "/health").json()["counts"]["cancelled"]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"messages\"".encode())
        s.shutdown(socket.SHUT_WR)
        reply = s.recv(4096)
    if reply and not reply.startswith(b"HTTP/1.1 400"):
        return f"got {reply[:80]!r}, expected a closed connection or a 400"
    health = request(port, "GET", "/health")
    if health.status != 200:
        return "the server stopped answering"
    return "" if health.json()["counts"]["cancelled"] > before else "the early end was not counted as cancelled"


def _disconnect(port: int, key: str) -> str:
    """A long streamed request whose client leaves: the engine must be free again within a few seconds."""
    import socket

    before = request(port, "GET", "/health").json()["counts"]["cancelled"]
    body = json.dumps(chat_body("Count from 1 to 1000, one number per line.", max_tokens=1500, stream=True,
                                ecso={"defense": False})).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
              f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    first = s.recv(256)  # the stream has started: the engine is busy generating
    s.close()
    if not first.startswith(b"HTTP/1.1 200"):
        return f"the stream did not start: {first[:80]!r}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        h = request(port, "GET", "/health").json()
        if h["queue"]["running"] == 0 and h["counts"]["cancelled"] > before:
            return ""
        time.sleep(0.05)
    return "the engine was still busy 10 s after the client left"


def cli_cases(models: BadModels, workdir: Path, demo_llm: str) -> Iterator[Outcome]:
    """ecso-run / ecso serve: one line `ecso: error: ...` on stderr, the right exit code, no traceback."""
    workdir.mkdir(parents=True, exist_ok=True)

    def expect(args: list[str], code: int, text: str = "") -> Callable[[], str]:
        def fn() -> str:
            env = {k: v for k, v in os.environ.items() if k != "ECSO_API_KEY"}
            r = subprocess.run(args, capture_output=True, text=True, timeout=180, env=env)
            lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
            ok = (r.returncode == code and len(lines) == 1 and lines[0].startswith("ecso: error:")
                  and text.lower() in lines[0].lower())
            return "" if ok else f"exit {r.returncode}, stderr {r.stderr.strip()[-300:]!r}"
        return fn

    cases: dict[str, Callable[[], str]] = {}
    for name, data in bad_images().items():
        path = workdir / (name.replace(" ", "-") + ".png")
        path.write_bytes(data)
        cases[f"ecso-run: {name} -> exit 2"] = expect(RUN + ["--image", str(path), "What is this?"], 2)
    street = str(workdir / "good.png")
    Path(street).write_bytes(good_png(2))
    cases.update({
        "ecso-run: empty query -> exit 2": expect(RUN + ["--image", street, "  "], 2, "empty"),
        "ecso-run: query longer than the context -> exit 2": expect(RUN + ["--ctx", "512", OVERLONG_QUERY], 2,
                                                                    "context"),
        "ecso-run: truncated GGUF -> exit 3": expect(RUN + ["--model", str(models.truncated), "hi"], 3),
        "ecso-run: non-GGUF file -> exit 3": expect(RUN + ["--model", str(models.not_gguf), "hi"], 3, "GGUF"),
        "ecso-run: mmproj of another model -> exit 3": expect(
            RUN + ["--model", demo_llm, "--mmproj", str(models.foreign_mmproj), "--image", street, "hi"], 3,
            "another model"),
        "ecso serve: truncated GGUF -> exit 3": expect(SERVE + ["--model", str(models.truncated), "--port", "0"], 3),
        "ecso serve: mmproj of another model -> exit 3": expect(
            SERVE + ["--model", demo_llm, "--mmproj", str(models.foreign_mmproj), "--port", "0"], 3),
        "ecso serve: public address without an API key -> exit 2": expect(
            SERVE + ["--host", "0.0.0.0", "--port", "0"], 2, "API key"),
    })
    for name, fn in cases.items():
        yield _check("cli", name, fn)


_API_MODEL_CASE = """
import sys
from ecso.runtime import Ecso, EngineConfig, ModelError
try:
    Ecso(EngineConfig(model=sys.argv[1], mmproj=sys.argv[2] or None))
except ModelError as e:
    print("ModelError:", e)
"""


def api_cases(engine, models: BadModels, demo_llm: str) -> Iterator[Outcome]:
    """The Python API raises typed errors (image / query cases in this process; model files in a child process,
    as a model file that crashed llama.cpp would take the process down)."""
    from ecso.runtime import ContextOverflowError, EcsoOptions, ImageError, InputError, run

    def expect(error: type, fn: Callable[[], object]) -> Callable[[], str]:
        def case() -> str:
            try:
                fn()
            except error as e:
                return "" if str(e) and "\n" not in str(e) else f"unclear message {e!r}"
            return f"no {error.__name__} raised"
        return case

    opts = EcsoOptions(max_tokens=4)
    cases = {f"{name} -> ImageError": expect(ImageError, lambda d=data: run(engine, d, "What is this?", opts))
             for name, data in bad_images().items()}
    cases.update({
        "empty query -> InputError": expect(InputError, lambda: run(engine, None, " ", opts)),
        "query longer than the context -> ContextOverflowError": expect(
            ContextOverflowError, lambda: run(engine, None, OVERLONG_QUERY, opts)),
        "unknown judge -> InputError": expect(InputError, lambda: run(engine, None, "hi", EcsoOptions(judge="x"))),
    })

    def model_case(model: Path | str, mmproj: str = "") -> Callable[[], str]:
        def case() -> str:
            r = subprocess.run([sys.executable, "-c", _API_MODEL_CASE, str(model), mmproj], capture_output=True,
                               text=True, timeout=300)
            ok = r.returncode == 0 and r.stdout.startswith("ModelError:")
            return "" if ok else f"exit {r.returncode}: {(r.stdout + r.stderr)[-300:]!r}"
        return case

    cases.update({
        "truncated GGUF -> ModelError": model_case(models.truncated),
        "non-GGUF file -> ModelError": model_case(models.not_gguf),
        "mmproj of another model -> ModelError": model_case(demo_llm, str(models.foreign_mmproj)),
        "the engine answers after all of the above": lambda: "" if run(engine, None, "Hi", opts).answer
        is not None else "no answer",
    })
    for name, fn in cases.items():
        yield _check("api", name, fn)


# ------------------------------------------------------------------------------------------------ load and soak
@dataclass
class LoadReport:
    clients: int
    answered: int = 0
    refused: int = 0  # 429 / 503 with an OpenAI-style error
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


def load(server: ServerProcess, clients: int = 50, max_tokens: int = 8) -> LoadReport:
    """`clients` requests released at the same instant (text, image and streaming mixed)."""
    report = LoadReport(clients)
    lock = threading.Lock()
    barrier = threading.Barrier(clients)
    image = good_png(5)

    def one(i: int) -> None:
        body = chat_body(f"Give me one word about the number {i}.", image if i % 3 == 1 else None, max_tokens,
                         stream=i % 3 == 2)
        barrier.wait()
        try:
            r = request(server.port, "POST", "/v1/chat/completions", body, api_key=server.api_key)
            ok = r.status == 200 and (b"data: [DONE]" in r.body if i % 3 == 2 else "choices" in r.json())
            kind = "answered" if ok else "refused" if r.status in (429, 503) and r.error else None
            problem = None if kind else f"client {i}: {r.status} {r.body[:120]!r}"
        except Exception as e:
            kind, problem = None, f"client {i}: {type(e).__name__}: {e}"
        with lock:
            if kind:
                setattr(report, kind, getattr(report, kind) + 1)
            else:
                report.failures.append(problem)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report.seconds = time.perf_counter() - t0
    if request(server.port, "GET", "/health").status != 200:
        report.failures.append("the server stopped answering /health after the burst")
    return report


@dataclass
class SoakReport:
    requests: int
    failures: list[str] = field(default_factory=list)
    rss_loaded: int = 0  # after the model loaded, before any request
    rss_start: int = 0  # after the warm-up (the image cache full)
    rss_end: int = 0
    rss_max: int = 0
    image_pool: int = 0
    seconds: float = 0.0
    stopped_early: bool = False  # the time limit was reached first

    @property
    def growth(self) -> float:
        return (self.rss_end - self.rss_start) / self.rss_start if self.rss_start else 0.0


def soak(server: ServerProcess, requests: int = 500, image_pool: int = 24, max_tokens: int = 8,
         image_every: int = 2, time_limit: float = 1800.0, progress: bool = True) -> SoakReport:
    """Warm-up: every pooled image once (fills the image cache and evicts), then `requests` sequential requests:
    text, an image every `image_every` (a random pool member: hits and evictions), every 4th one streamed;
    RSS sampled every 25."""
    report = SoakReport(requests, image_pool=image_pool, rss_loaded=server.rss())
    images = [good_png(100 + i) for i in range(image_pool)]
    rng = random.Random(0)
    port, key = server.port, server.api_key

    def one(i: int, image: Optional[bytes]) -> None:
        stream = i % 4 == 3
        r = request(port, "POST", "/v1/chat/completions",
                    chat_body(f"Name a colour (request {i}).", image, max_tokens, stream=stream), api_key=key)
        ok = r.status == 200 and (b"data: [DONE]" in r.body if stream else "choices" in r.json())
        if not ok:
            report.failures.append(f"request {i}: {r.status} {r.body[:120]!r}")

    t0 = time.perf_counter()
    for i, img in enumerate(tqdm(images, desc="soak warm-up", disable=not progress)):
        one(-1 - i, img)
    report.rss_start = report.rss_max = server.rss()
    done = 0
    for i in tqdm(range(requests), desc="soak", disable=not progress):
        if time.perf_counter() - t0 > time_limit:
            report.stopped_early = True
            break
        one(i, rng.choice(images) if i % image_every == 1 % image_every else None)
        done += 1
        if i % 25 == 24:
            report.rss_max = max(report.rss_max, server.rss())
    report.requests = done
    report.rss_end = server.rss()
    report.rss_max = max(report.rss_max, report.rss_end)
    report.seconds = time.perf_counter() - t0
    return report


def as_dict(obj) -> dict:
    d = asdict(obj)
    if isinstance(obj, SoakReport):
        d["growth"] = obj.growth
    return d
