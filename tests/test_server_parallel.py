"""`ecso serve --parallel N`: N requests run at once, each on its own KV sequence, sharing every llama_decode
(runtime/batch.py's BatchPool), behind the same bounded queue. Real HTTP, real llama.cpp: the demo model (real
SmolLM2) through the `ecso serve` CLI in a child process and through an in-process server whose engine the test can
inspect, and the tiny f32 LLaVA where llama.cpp's batched arithmetic is exact (see tests/test_batch.py)."""

from __future__ import annotations

import base64
import threading
import time

import openai
import pytest

from ecso.runtime import EcsoOptions, Engine, EngineConfig
from ecso.server import EcsoServer, ServerConfig
from support.reliability import ServerProcess, chat_body, good_png, open_chat_request, request

ALWAYS_UNSAFE = {"judge": "logit", "logit_threshold": 0.0}  # P(yes) >= 0 always: all four steps run
COUNTING = {"messages": [{"role": "user", "content": "Count from 1 to 500, one number per line."}],
            "max_tokens": 400, "ecso": {"defense": False}}  # keeps a slot busy for seconds


def _user(query: str, png: bytes | None) -> list[dict]:
    if png is None:
        return [{"role": "user", "content": query}]
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": query}]}]


# different images and queries: a leak of one request's tokens or image into another would change its answer
REQUESTS = [("What is in this picture?", good_png(seed=101)), ("Describe the colours you see.", good_png(seed=102)),
            ("Name three fruits.", None), ("Is this a safe place to walk at night?", good_png(seed=103))]


def _at_once(send, n: int) -> tuple[list, int]:
    """Sends n requests from n threads released together; returns their replies and the most slots /health
    reported busy at one time while they ran (polled from the test, over HTTP)."""
    replies: list = [None] * n
    gate = threading.Barrier(n)

    def one(i: int) -> None:
        gate.wait()
        replies[i] = send(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, replies


def _peak_busy(port: int, threads: list) -> int:
    peak = 0
    while any(t.is_alive() for t in threads):
        peak = max(peak, request(port, "GET", "/health").json()["slots"]["busy"])
        time.sleep(0.05)
    for t in threads:
        t.join()
    return peak


def _wait_for(what, limit: float = 60.0) -> float:
    t0 = time.monotonic()
    while not what():
        assert time.monotonic() - t0 < limit, "timed out"
        time.sleep(0.01)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def demo_cli(demo_files):
    """`ecso serve --parallel 4` as a user starts it (1 request may wait while the 4 slots are busy)."""
    with ServerProcess(["--model", demo_files[0], "--mmproj", demo_files[1], "--ctx", "1024", "--threads", "2",
                        "--parallel", "4", "--max-waiting", "1", "--max-tokens", "12"]) as s:
        yield s


def test_openai_clients_are_served_four_at_once_each_with_its_lone_verdict(demo_cli):
    """4 openai-client requests at once on --parallel 4: /health shows all 4 slots busy together, each reply says
    it ran on its own slot with 4 in flight, and each verdict equals what the same request gets alone (docs/server.md's
    agreement for batching on the demo model: verdicts identical; texts may differ in near-ties)."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{demo_cli.port}/v1", api_key="unused", max_retries=0,
                           timeout=300)

    def send(i: int):
        query, png = REQUESTS[i]
        return client.chat.completions.create(model="demo", messages=_user(query, png), max_tokens=12)

    alone = [send(i) for i in range(4)]
    assert all(r.ecso["slot"]["max_concurrent"] == 1 for r in alone)
    threads, together = _at_once(send, 4)
    assert _peak_busy(demo_cli.port, threads) == 4
    assert sorted(r.ecso["slot"]["index"] for r in together) == [1, 2, 3, 4]
    assert all(r.ecso["slot"] == {**r.ecso["slot"], "slots": 4, "max_concurrent": 4} for r in together)
    same_text = 0
    for a, t in zip(alone, together):
        assert t.choices[0].message.content.strip()
        assert t.ecso["unsafe"] == a.ecso["unsafe"]
        same_text += t.choices[0].message.content == a.choices[0].message.content
    print(f"\n[parallel 4, demo] verdicts 4/4 equal to lone runs, texts {same_text}/4 identical")
    health = request(demo_cli.port, "GET", "/health").json()
    assert health["slots"] == {"total": 4, "busy": 0, "free": 4, "batched": True}


def test_requests_beyond_the_slots_and_the_queue_get_a_clean_429(demo_cli):
    port = demo_cli.port
    before = request(port, "GET", "/health").json()["counts"]
    socks = [open_chat_request(port, COUNTING) for _ in range(5)]  # 4 slots + 1 waiting
    try:
        _wait_for(lambda: request(port, "GET", "/health").json()["queue"] == {"running": 4, "waiting": 1,
                                                                              "max_waiting": 1})
        r = request(port, "POST", "/v1/chat/completions", chat_body("hi", max_tokens=2))
        assert r.status == 429 and r.json()["error"]["code"] == "queue_full" and r.headers["Retry-After"]
        assert "4 slot(s) are running" in r.error
    finally:
        for s in socks:
            s.close()
    _wait_for(lambda: request(port, "GET", "/health").json()["slots"]["busy"] == 0)
    after = request(port, "GET", "/health").json()["counts"]
    assert after["refused"] == before["refused"] + 1 and after["cancelled"] == before["cancelled"] + 5
    assert request(port, "POST", "/v1/chat/completions", chat_body("hi", max_tokens=2)).status == 200


# --------------------------------------------------------------------------------- in process: the engine's side
@pytest.fixture(scope="module")
def demo_parallel(demo_files):
    with Engine(EngineConfig(model=demo_files[0], mmproj=demo_files[1], n_ctx=1024, n_threads=2,
                             parallel=4)) as eng:
        yield eng


def _cells(engine: Engine, seq: int) -> int:
    """Positions llama.cpp's KV cache holds for a sequence (0: empty)."""
    return engine.context.positions(seq)


def test_a_client_leaving_frees_its_slot_and_kv_sequence_for_the_next_request(demo_parallel):
    eng = demo_parallel
    with EcsoServer(eng, EcsoOptions(max_tokens=8), ServerConfig(port=0, log=False, max_waiting=1)).start() as s:
        busy = [open_chat_request(s.port, COUNTING) for _ in range(4)]
        _wait_for(lambda: s.health()["slots"]["busy"] == 4)
        nxt: list = []
        waiter = threading.Thread(target=lambda: nxt.append(
            request(s.port, "POST", "/v1/chat/completions", chat_body("Name a fruit.", max_tokens=4))))
        waiter.start()
        _wait_for(lambda: s.health()["queue"]["waiting"] == 1)
        _wait_for(lambda: min(_cells(eng, q) for q in range(1, 5)) > 60)  # every slot is generating
        busy.pop(0).close()
        freed = _wait_for(lambda: s.health()["queue"]["waiting"] == 0, limit=30)
        assert freed < 2.0, freed  # at its next token, not when its 400 tokens are done
        waiter.join(120)
        assert nxt and nxt[0].status == 200 and nxt[0].json()["choices"][0]["message"]["content"].strip()
        assert nxt[0].json()["ecso"]["slot"]["max_concurrent"] == 4  # it ran beside the 3 still counting
        assert s.health()["slots"]["busy"] == 3 and s.health()["counts"]["cancelled"] == 1
        print(f"\n[parallel 4] a slot was handed to the waiting request {freed:.3f} s after its client left")
        for sock in busy:
            sock.close()
        _wait_for(lambda: s.health()["slots"]["busy"] == 0)
        # the 4 cancelled requests' sequences were emptied; only the answered one keeps its cells (for reuse)
        assert sorted(_cells(eng, q) > 0 for q in range(1, 5)) == [False, False, False, True]
        assert s.health()["counts"]["cancelled"] == 4
    assert _cells(eng, 0) == 0  # sequence 0 (the single-request path) was never touched


# ------------------------------------------------------------------------- tiny f32 LLaVA: exact batched texts
def test_different_images_and_queries_in_flight_together_get_exactly_their_lone_answers(tiny):
    """On the f32 tiny LLaVA batching is exact (tests/test_batch.py), so all four steps' texts must equal the same
    request served alone: a token or image of another request in flight would change them. One of the four is
    streamed (its events come through the pool), one carries an earlier turn as history."""
    cfg = EngineConfig(model=str(tiny.llm), mmproj=str(tiny.mmproj), n_ctx=512, kv_f32=True, flash_attn=False,
                       n_threads=2, parallel=4)
    opts = EcsoOptions(max_tokens=16, caption_max_tokens=16, judge_max_tokens=8)
    with Engine(cfg) as eng, EcsoServer(eng, opts, ServerConfig(port=0, log=False)).start() as s:
        def send(i: int):
            query, png = REQUESTS[i]
            messages = _user(query, png or good_png(seed=104))
            if i == 2:
                messages = [{"role": "user", "content": "Hello there."},
                            {"role": "assistant", "content": "Hello! Ask me about an image."}] + messages
            body = {"messages": messages, "max_tokens": 16, "ecso": ALWAYS_UNSAFE, "stream": i == 1}
            reply = request(s.port, "POST", "/v1/chat/completions", body)
            assert reply.status == 200, reply.body[:300]
            return _streamed(reply.body) if i == 1 else reply.json()

        alone = [send(i) for i in range(4)]
        # a tiny request takes milliseconds: hold each one at its first evaluation until all four have a slot, so
        # they certainly run together (the engine's observer hook runs in the request's thread)
        all_in = threading.Event()
        eng.observer = lambda kind, what, pos0: all_in.wait(30)
        try:
            threads, together = _at_once(send, 4)
            _wait_for(lambda: s.health()["slots"]["busy"] == 4)
            all_in.set()
            for t in threads:
                t.join()
        finally:
            eng.observer = None
    assert together[1]["chunks"] > 3 and together[2]["ecso"]["turns_dropped"] == 0
    for a, t in zip(alone, together):
        assert t["ecso"]["slot"]["max_concurrent"] == 4
        assert [x["name"] for x in t["ecso"]["timings"]["steps"]] == ["answer", "judge", "caption", "regenerate"]
        assert (t["choices"][0]["message"]["content"], t["ecso"]["caption"], t["ecso"]["unsafe"]) == \
               (a["choices"][0]["message"]["content"], a["ecso"]["caption"], a["ecso"]["unsafe"])
        assert t["ecso"]["judge_score"] == pytest.approx(a["ecso"]["judge_score"], abs=1e-5)
    assert len({t["choices"][0]["message"]["content"] for t in together}) > 1  # the requests really differ


def _streamed(body: bytes) -> dict:
    """An SSE reply read back into the shape of a JSON one: the streamed text, and the final chunk's `ecso`."""
    import json

    text, ecso, chunks = "", None, 0
    for line in body.decode().splitlines():
        if line.startswith("data: {"):
            chunk = json.loads(line[6:])
            chunks += 1
            for choice in chunk.get("choices", []):
                text += choice["delta"].get("content") or ""
            ecso = chunk.get("ecso") or ecso
    return {"choices": [{"message": {"content": text}}], "ecso": ecso, "chunks": chunks}
