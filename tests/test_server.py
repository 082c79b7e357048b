"""`ecso serve` as OpenAI clients use it: the real `openai` package against a server on a free loopback port,
running ECSO on the real demo model (one engine on one thread, shared by the module)."""

from __future__ import annotations

import asyncio
import base64
import http.server
import threading
import time

import openai
import pytest

from ecso.runtime import InputError
from ecso.server import LIVE_UNSAFE_NOTICE, EcsoServer, MediaPolicy, ServerConfig
from ecso.server.app import QueueFull, QueueTimeout, RequestQueue
from ecso.server.media import fetch_image
from ecso.server.schemas import ApiError
from support.ecso_server import start_server
from support.reliability import good_png, request

ALWAYS_UNSAFE = {"judge": "logit", "logit_threshold": 0.0}  # P(yes) >= 0 always: forces steps 3-4


@pytest.fixture(scope="module")
def engine(demo_files):
    """The demo model on one thread: a server test must not slow to a crawl when the machine is busy."""
    from ecso.runtime import Engine, EngineConfig

    with Engine(EngineConfig(model=demo_files[0], mmproj=demo_files[1], n_ctx=2048, n_threads=1)) as eng:
        yield eng


@pytest.fixture(scope="module")
def server(engine):
    with start_server(engine) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def _image_part(png: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}


def test_openai_client_lists_the_model_and_gets_an_answer_with_the_ecso_object(client):
    assert [m.id for m in client.models.list()] == ["demo"]
    r = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Name a fruit."}],
                                       max_tokens=8)
    assert r.choices[0].message.content.strip() and r.choices[0].finish_reason in ("stop", "length")
    assert r.model == "demo" and r.usage.completion_tokens >= 1
    ecso = r.ecso  # extra field: ignored by OpenAI clients, readable by those who want it
    assert isinstance(ecso["unsafe"], bool) and ecso["judge"] == "paper" and ecso["prompt_version"]
    assert [s["name"] for s in ecso["timings"]["steps"]][:2] == ["answer", "judge"]
    assert "initial_answer" not in ecso  # the (possibly unsafe) first answer never leaves the server


def test_image_is_encoded_once_and_a_follow_up_turn_reuses_it(client):
    png = good_png(seed=4242)  # an image no other test has sent: the first request must encode it
    first_turn = {"role": "user", "content": [{"type": "text", "text": "What is in this picture?"}, _image_part(png)]}
    r1 = client.chat.completions.create(model="demo", messages=[first_turn], max_tokens=8)
    assert r1.ecso["image_encodes"] == 1 and r1.ecso["image_cache_hit"] is False
    follow_up = [first_turn, {"role": "assistant", "content": r1.choices[0].message.content},
                 {"role": "user", "content": "Which colour stands out?"}]
    r2 = client.chat.completions.create(model="demo", messages=follow_up, max_tokens=8)
    assert r2.ecso["image_encodes"] == 0 and r2.ecso["image_cache_hit"] is True
    assert r2.ecso["turns_dropped"] == 0  # both earlier turns went to the model as history
    answer_step = r2.ecso["timings"]["steps"][0]
    assert answer_step["reused_positions"] > 256  # system + 256 image positions came from the KV cache
    assert answer_step["prompt_positions"] > r1.ecso["timings"]["steps"][0]["prompt_positions"]  # + history


def test_streaming_sends_the_same_answer_as_non_streaming_then_usage(client):
    msgs = [{"role": "user", "content": "Tell me about the sea."}]
    whole = client.chat.completions.create(model="demo", messages=msgs, max_tokens=12)
    chunks = list(client.chat.completions.create(model="demo", messages=msgs, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][0]
    assert final.ecso["unsafe"] == whole.ecso["unsafe"] and chunks[-1].usage.total_tokens > 0


def test_held_stream_never_sends_an_answer_judged_unsafe(client):
    msgs = [{"role": "user", "content": "Describe a busy street."}]
    plain = client.chat.completions.create(model="demo", messages=msgs, max_tokens=12, extra_body={
        "ecso": {"defense": False}}).choices[0].message.content
    stream = client.chat.completions.create(model="demo", messages=msgs, max_tokens=12, stream=True,
                                            extra_body={"ecso": ALWAYS_UNSAFE})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][0]
    assert final.ecso["unsafe"] is True and [s["name"] for s in final.ecso["timings"]["steps"]][-1] == "regenerate"
    assert text and plain not in text  # only the eyes-closed regenerated answer reached the client


def test_live_stream_streams_at_once_and_flags_the_regenerated_answer(engine):
    with start_server(engine, stream_mode="live") as live:
        c = openai.OpenAI(base_url=live.url, api_key="x", max_retries=0)
        msgs = [{"role": "user", "content": "Describe a busy street."}]
        plain = c.chat.completions.create(model="demo", messages=msgs, max_tokens=12,
                                          extra_body={"ecso": {"defense": False}}).choices[0].message.content
        text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="demo", messages=msgs, max_tokens=12, stream=True, extra_body={"ecso": ALWAYS_UNSAFE})
            if ch.choices)
    assert text.startswith(plain) and LIVE_UNSAFE_NOTICE in text


def test_api_key_is_required_when_set_but_health_stays_open(engine):
    with start_server(engine, api_key="s3cret") as s:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url, api_key="wrong", max_retries=0).models.list()
        assert [m.id for m in openai.OpenAI(base_url=s.url, api_key="s3cret").models.list()] == ["demo"]
        assert request(s.port, "GET", "/health").status == 200


def test_errors_reach_openai_clients_as_typed_exceptions(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "why " * 3000}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="refused"):
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": [
            {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}])
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], n=2)
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}])


def _busy(server: EcsoServer) -> threading.Thread:
    """Starts a long undefended request and returns once it holds the engine."""
    body = {"messages": [{"role": "user", "content": "Count from 1 to 500."}], "max_tokens": 40,
            "ecso": {"defense": False}}
    t = threading.Thread(target=request, args=(server.port, "POST", "/v1/chat/completions", body))
    t.start()
    deadline = time.monotonic() + 30
    while server.queue.running == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.queue.running == 1
    return t


def test_full_queue_refuses_with_429_and_a_long_wait_gets_503(engine):
    hi = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with start_server(engine, max_waiting=0) as s:
        busy = _busy(s)
        r = request(s.port, "POST", "/v1/chat/completions", hi)
        assert r.status == 429 and r.json()["error"]["code"] == "queue_full" and r.headers["Retry-After"]
        busy.join()
        assert request(s.port, "POST", "/v1/chat/completions", hi).status == 200  # still serving
    with start_server(engine, max_waiting=1, queue_timeout=0.3) as s:
        busy = _busy(s)
        r = request(s.port, "POST", "/v1/chat/completions", hi)
        assert r.status == 503 and r.json()["error"]["code"] == "queue_timeout"
        busy.join()
        assert s.health()["counts"]["refused"] == 1


def test_connections_beyond_the_limit_get_503_and_free_slots_are_reused(engine):
    import socket

    with start_server(engine, max_connections=3) as s:
        idle = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(3)]
        time.sleep(0.2)  # the server has accepted them: every connection slot is taken
        r = request(s.port, "GET", "/health")
        assert r.status == 503 and r.json()["error"]["code"] == "too_many_connections"
        for sock in idle:
            sock.close()
        deadline = time.monotonic() + 5
        while request(s.port, "GET", "/health").status != 200:
            assert time.monotonic() < deadline, "slots were not released when the idle clients left"
            time.sleep(0.05)


@pytest.mark.fast
def test_request_queue_is_first_in_first_out_and_bounded():
    async def scenario() -> list[int]:
        q = RequestQueue(max_waiting=3, timeout=10)
        first = await q.enter()
        order: list[int] = []

        async def waiter(i: int) -> None:
            slot = await q.enter()
            order.append(i)
            q.leave(slot)

        tasks = []
        for i in range(3):
            tasks.append(asyncio.ensure_future(waiter(i)))
            while q.waiting <= i:
                await asyncio.sleep(0.001)
        with pytest.raises(QueueFull):
            await q.enter()
        q.leave(first)
        await asyncio.gather(*tasks)
        assert q.running == 0 and q.waiting == 0
        q2 = RequestQueue(max_waiting=1, timeout=0.05)
        await q2.enter()
        with pytest.raises(QueueTimeout):
            await q2.enter()
        assert q2.waiting == 0
        return order

    assert asyncio.run(scenario()) == [0, 1, 2]


@pytest.mark.fast
def test_request_queue_with_slots_runs_that_many_and_hands_out_distinct_slots():
    async def scenario() -> None:
        q = RequestQueue(max_waiting=1, timeout=10, slots=3)
        slots = [await q.enter() for _ in range(3)]  # no wait: three slots
        assert sorted(slots) == [1, 2, 3] and q.running == 3 and q.waiting == 0
        waiter = asyncio.ensure_future(q.enter())
        while q.waiting == 0:
            await asyncio.sleep(0.001)
        with pytest.raises(QueueFull):  # 3 running + 1 waiting
            await q.enter()
        q.leave(slots[1])
        assert await waiter == slots[1] and q.running == 3  # the freed slot goes to the waiter
        for s in (slots[0], slots[1], slots[2]):
            q.leave(s)
        assert q.running == 0 and q.admitted == 0

    asyncio.run(scenario())


def test_public_bind_needs_an_api_key(engine):
    with pytest.raises(InputError, match="API key"):
        EcsoServer(engine, config=ServerConfig(host="0.0.0.0", port=0))


@pytest.mark.fast
def test_images_come_only_from_data_uris_unless_allow_listed(tmp_path):
    png = good_png(9)
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(png)
    (tmp_path / "secret.png").write_bytes(png)
    (allowed / "link.png").symlink_to(tmp_path / "secret.png")
    data_uri = "data:image/png;base64," + base64.b64encode(png).decode()
    assert fetch_image(data_uri, MediaPolicy()) == png
    policy = MediaPolicy(allow_file_dirs=(str(allowed),))
    assert fetch_image((allowed / "a.png").as_uri(), policy) == png
    refused = [((allowed / "a.png").as_uri(), MediaPolicy()),  # no allow-list: file:// is refused
               (f"file://{allowed}/../secret.png", policy),  # escaping with ..
               ((allowed / "link.png").as_uri(), policy)]  # escaping with a symlink
    for url, pol in refused:
        with pytest.raises(ApiError) as e:
            fetch_image(url, pol)
        assert e.value.status == 400 and e.value.code == "image_url_not_allowed", url
    with pytest.raises(ApiError) as e:
        fetch_image(data_uri, MediaPolicy(max_image_bytes=len(png) - 1))
    assert e.value.status == 413


def test_remote_images_only_from_allowed_domains_and_without_redirects():
    png = good_png(10)

    class Images(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "http://127.0.0.2/elsewhere.png")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Images)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        assert fetch_image(base + "/x.png", MediaPolicy(allow_domains=("127.0.0.1",))) == png
        for url, policy in ((base + "/x.png", MediaPolicy()), (base + "/x.png", MediaPolicy(allow_domains=("ex.com",))),
                            (base + "/redirect", MediaPolicy(allow_domains=("127.0.0.1",)))):
            with pytest.raises(ApiError) as e:
                fetch_image(url, policy)
            assert e.value.status == 400
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_serve_without_the_server_extra_says_what_to_install():
    from conftest import run_python

    r = run_python("import sys; sys.modules['sse_starlette'] = None  # as if the server extra were not installed\n"
                   "sys.argv = ['ecso', 'serve', '--port', '0']\n"
                   "from ecso.cli.main import main; main()")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0] == "ecso: error: ecso serve needs the server extra (sse_starlette not installed): " \
                       "pip install 'ecso[server]'"


def test_validation_errors_name_the_field_in_openai_style(server):
    bad = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 3}}]}]}
    r = request(server.port, "POST", "/v1/chat/completions", bad)
    err = r.json()["error"]
    assert r.status == 400 and err["type"] == "invalid_request_error"
    assert err["param"] == "messages[0].content[0].image_url.url" and err["message"].startswith(err["param"] + ":")
    r = request(server.port, "POST", "/v1/chat/completions",
                {"messages": [{"role": "robot", "content": "hi"}]})
    assert r.status == 400 and r.json()["error"]["param"] == "messages[0].role"
