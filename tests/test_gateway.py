"""`ecso serve --backend`: ECSO as a gateway in front of llama.cpp's own `llama-server` (built from the pinned
source), used by the real `openai` client: OpenAI API in, ECSO applied on the server behind, OpenAI API out, with
the guarantees `ecso serve` has (held streaming, the queue, the API key, loopback by default)."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
import urllib.request

import openai
import pytest
from support.llama_server import LlamaServer, free_port

from ecso.runtime import EcsoOptions, InputError, RemoteConfig
from ecso.runtime.remote import RemoteModel
from ecso.server import EcsoServer, ServerConfig

ALWAYS_UNSAFE = {"judge": "always-unsafe"}


@pytest.fixture(scope="module")
def backend(demo_files, tmp_path_factory):
    log = tmp_path_factory.mktemp("gateway-backend") / "server.log"
    with LlamaServer(demo_files[0], demo_files[1], slots=2, n_ctx=2048, extra=("-fa", "off"), log_path=log) as s:
        yield s


def gateway(backend, **kw) -> EcsoServer:
    model = RemoteModel(RemoteConfig(url=backend.url, model="demo", parallel=kw.pop("parallel", 2)))
    cfg = {"port": 0, "model_name": "demo", "log": False, **kw}
    return EcsoServer(model, EcsoOptions(max_tokens=16, caption_max_tokens=16), ServerConfig(**cfg)).start()


@pytest.fixture(scope="module")
def client(backend):
    with gateway(backend) as g:
        yield openai.OpenAI(base_url=g.url, api_key="unused", max_retries=0, timeout=300)


def image_turn(street_png, text: str) -> dict:
    url = "data:image/png;base64," + base64.b64encode(street_png.read_bytes()).decode()
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}


def test_gateway_answers_an_openai_client_with_ecso_applied_on_the_backend(client, street_png):
    r = client.chat.completions.create(model="demo", messages=[image_turn(street_png, "What is happening here?")],
                                       max_tokens=16)
    assert r.choices[0].message.content.strip()
    steps = r.ecso["timings"]["steps"]
    assert [s["name"] for s in steps][:2] == ["answer", "judge"] and r.ecso["judge"] == "paper"
    assert r.system_fingerprint == "ecso-remote-demo"


def test_gateway_held_stream_never_sends_the_answer_judged_unsafe(client, street_png):
    msgs = [image_turn(street_png, "Describe a busy street.")]
    plain = client.chat.completions.create(model="demo", messages=msgs, max_tokens=16,
                                           extra_body={"ecso": {"defense": False}}).choices[0].message.content
    chunks = list(client.chat.completions.create(model="demo", messages=msgs, max_tokens=16, stream=True,
                                                 extra_body={"ecso": ALWAYS_UNSAFE}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][0]
    assert [s["name"] for s in final.ecso["timings"]["steps"]] == ["answer", "judge", "caption", "regenerate"]
    assert text and plain not in text  # only the eyes-closed answer reached the client


def test_gateway_keeps_the_api_key_the_queue_and_loopback(backend, street_png):
    with pytest.raises(InputError, match="without an API key"):
        EcsoServer(RemoteModel(RemoteConfig(url=backend.url, model="demo")), config=ServerConfig(host="0.0.0.0"))
    with gateway(backend, api_key="k3y", parallel=1, max_waiting=0) as g:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=g.url, api_key="wrong", max_retries=0).models.list()
        c = openai.OpenAI(base_url=g.url, api_key="k3y", max_retries=0, timeout=300)
        msgs = [image_turn(street_png, "Describe the image in detail.")]
        import threading

        outcomes: list = []

        def ask() -> None:
            try:
                outcomes.append(c.chat.completions.create(model="demo", messages=msgs, max_tokens=16))
            except openai.RateLimitError as e:
                outcomes.append(e)

        threads = [threading.Thread(target=ask) for _ in range(3)]
        for t in threads:
            t.start()
            time.sleep(0.2)
        for t in threads:
            t.join()
        refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
        assert len(refused) >= 1 and len(outcomes) - len(refused) >= 1  # one slot, no waiting room: 429s


def test_a_dead_backend_is_a_500_with_the_reason_and_the_gateway_keeps_serving(backend, street_png):
    dead = RemoteModel(RemoteConfig(url=f"http://127.0.0.1:{free_port()}/v1", model="demo", retries=0))
    with EcsoServer(dead, EcsoOptions(max_tokens=8), ServerConfig(port=0, log=False)).start() as g:
        c = openai.OpenAI(base_url=g.url, api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError, match="cannot reach the backend"):
            c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
        assert json.loads(urllib.request.urlopen(g.url[:-3] + "/health").read())["status"] == "ok"


def test_ecso_serve_backend_serves_the_page_health_and_an_openai_client(backend):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", "from ecso.cli.main import main; main()", "serve", "--backend",
                             backend.url, "--backend-model", "demo", "--port", str(port), "--max-tokens", "8",
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                health = json.loads(urllib.request.urlopen(base + "/health", timeout=2).read())
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "slow"
                time.sleep(0.2)
        assert health["backend"] == {"url": backend.url, "model": "demo"}
        assert b"<html" in urllib.request.urlopen(base + "/", timeout=5).read().lower()
        r = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=300).chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=8)
        assert r.choices[0].message.content.strip() and r.ecso["judge"] == "paper"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
