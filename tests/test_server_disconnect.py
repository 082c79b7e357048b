"""A client that goes away frees the engine promptly, even while nothing is being sent to it: mid-prefill of the
answer, or while the judge re-reads a long prompt (held mode). The runtime's `should_cancel` hook is checked per
decode batch; a cancelled request leaves the engine consistent (real demo model, small decode batches)."""

from __future__ import annotations

import json
import time

import pytest

from ecso.runtime import Cancelled, EcsoOptions, run
from ecso.server import EcsoServer, ServerConfig
from support.reliability import open_chat_request, request

# ~300 tokens: long enough that a prefill in batches of 16 takes many checks
LONG_QUERY = "Please read this note. " + "The river runs past the old mill and the quiet town. " * 25 + "Summarise it."


@pytest.fixture(scope="module")
def engine(demo_files):
    from ecso.runtime import Engine, EngineConfig

    with Engine(EngineConfig(model=demo_files[0], mmproj=demo_files[1], n_ctx=2048, n_threads=1,
                             n_batch=16)) as eng:
        yield eng


@pytest.fixture(scope="module")
def server(engine):
    with EcsoServer(engine, EcsoOptions(max_tokens=4), ServerConfig(port=0, model_name="demo", log=False)).start() as s:
        yield s


def _released_after(server: EcsoServer, since: float, limit: float = 60) -> float:
    while server.queue.running:
        assert time.monotonic() - since < limit, "the engine was never released"
        time.sleep(0.01)
    return time.monotonic() - since


def test_cancel_hook_stops_mid_prefill_and_leaves_the_engine_consistent(engine):
    engine.reset()
    reference = run(engine, None, LONG_QUERY, EcsoOptions(max_tokens=4))
    checks = []

    def cancel_on_the_fifth_check() -> bool:
        checks.append(engine.n_past)
        return len(checks) >= 5

    with pytest.raises(Cancelled):
        run(engine, None, "Another question. " + LONG_QUERY, EcsoOptions(max_tokens=4),
            should_cancel=cancel_on_the_fifth_check)
    assert len(checks) == 5  # stopped at the check that said so, inside step 1's prefill
    again = run(engine, None, LONG_QUERY, EcsoOptions(max_tokens=4))
    assert (again.answer, again.judge_reply) == (reference.answer, reference.judge_reply)


def test_disconnect_during_the_answer_prefill_frees_the_engine_at_once(server, engine):
    engine.reset()
    seen: list[tuple[float, int, int]] = []
    engine.observer = lambda kind, what, pos0: seen.append((time.monotonic(), len(what) if kind == "text" else 0,
                                                             pos0))
    before = server.health()["counts"]
    try:
        client = open_chat_request(server.port, {"messages": [{"role": "user", "content": LONG_QUERY}], "max_tokens": 4})
        deadline = time.monotonic() + 60
        while not any(n > 200 for _, n, _ in seen):  # the query's piece is being prefilled
            assert time.monotonic() < deadline
            time.sleep(0.005)
        start, n, pos0 = next(s for s in seen if s[1] > 200)
        time.sleep(0.2)
        client.close()
        gone = time.monotonic()
        released = _released_after(server, gone)
    finally:
        engine.observer = None
    print(f"\n[disconnect mid-prefill] engine released {released:.3f} s after the client left")
    assert engine.n_past < pos0 + n  # the query's prefill never completed: it was stopped between batches
    assert released < 2.0, released
    after = server.health()["counts"]
    assert after["cancelled"] == before["cancelled"] + 1 and after["answered"] == before["answered"]
    assert request(server.port, "POST", "/v1/chat/completions",
                   {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).status == 200


def test_disconnect_during_the_judge_step_frees_the_engine_before_the_judge_finishes(server, engine):
    """Held mode sends nothing while the judge runs: the disconnect is noticed by the server, not by a failed write."""
    engine.reset()
    before = server.health()["counts"]
    client = open_chat_request(server.port, {"messages": [{"role": "user", "content": LONG_QUERY}], "max_tokens": 4,
                                 "stream": True, "stream_options": {"ecso_events": True}})
    buf, answer_prefill = b"", None
    while b'"step": "judge"' not in buf:
        part = client.recv(65536)
        assert part, buf[-300:]
        buf += part
    for line in buf.decode().splitlines():
        if line.startswith("data: ") and '"step_end"' in line and '"step": "answer"' in line:
            answer_prefill = json.loads(line[6:])["timing"]["prefill_seconds"]
    client.close()
    released = _released_after(server, time.monotonic())
    assert answer_prefill is not None, buf[-500:]
    print(f"\n[disconnect mid-judge] engine released {released:.3f} s after the client left "
          f"(the answer's prefill took {answer_prefill:.2f} s; the judge's is longer)")
    # the judge re-reads the query and the answer (TELL): at least as long as the answer's prefill
    assert released < 0.5 * answer_prefill, (released, answer_prefill)
    after = server.health()["counts"]
    assert after["cancelled"] == before["cancelled"] + 1 and after["answered"] == before["answered"]
