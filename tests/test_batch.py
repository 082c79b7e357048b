"""N ECSO requests decoded together (runtime/batch.py), on real llama.cpp: the tiny f32 LLaVA (exact arithmetic)
and the demo model (real SmolLM2).

Batched decoding puts several sequences in one unified KV cache: a sequence's cells then sit among other
sequences' cells, and llama.cpp's vectorised attention sums in another order. So outputs agree with sequential
runs up to last-bit rounding (exact equality wherever the layout is the same), never by leaking one request's
tokens into another: those would move logits by O(1), not 1e-6.
"""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image

from ecso.eval.decode_ceiling import ceiling_decode_tok_s
from ecso.runtime import Ecso, EcsoOptions, Engine, EngineConfig, ImageError, InputError, Message, Result, run
from ecso.runtime.batch import BatchPool, BatchScheduler, DecodeStats, Request, SequenceView, run_batched

ALWAYS_UNSAFE = dict(judge="logit", logit_threshold=0.0)
SMALL = dict(max_tokens=16, caption_max_tokens=16, judge_max_tokens=8)


def png(seed: int, size: int = 56) -> bytes:
    """A distinct random image per seed."""
    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


REQUESTS = [(png(i), q) for i, q in enumerate(["What is shown?", "Is it beautiful is better than ugly?",
                                                 "Explicit is better than implicit.", "Simple is better.",
                                                 "Flat is better than nested?"])]


def tiny_config(tiny, **kw) -> EngineConfig:
    return EngineConfig(model=str(tiny.llm), mmproj=str(tiny.mmproj), n_ctx=512, kv_f32=True, flash_attn=False,
                        n_threads=2, **kw)


@pytest.fixture(scope="module")
def tiny_parallel(tiny):
    eng = Engine(tiny_config(tiny, parallel=4))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def tiny_sequential(tiny):
    eng = Engine(tiny_config(tiny))
    yield eng
    eng.close()


def batched(engine, requests, opts) -> list:
    out = dict(run_batched(engine, [Request(i, q) for i, q in requests], opts, None))
    return [out[i] for i in range(len(requests))]


def test_sequence_zero_of_a_parallel_engine_is_bit_exact_with_a_single_engine(tiny_parallel, tiny_sequential):
    """The single-request path is untouched by a parallel context (reuse and no reuse, before and after a batch)."""
    for reuse in (True, False):
        opts = EcsoOptions(**ALWAYS_UNSAFE, **SMALL, reuse=reuse)
        for eng in (tiny_parallel, tiny_sequential):
            eng.reset()
        want = [run(tiny_sequential, i, q, opts) for i, q in REQUESTS[:2]]
        got = [run(tiny_parallel, i, q, opts) for i, q in REQUESTS[:2]]
        batched(tiny_parallel, REQUESTS[2:4], opts)  # sequences 1..4 used and cleared in between
        got += [run(tiny_parallel, i, q, opts) for i, q in REQUESTS[:2]]
        want += [run(tiny_sequential, i, q, opts) for i, q in REQUESTS[:2]]
        for w, g in zip(want, got):
            assert (g.answer, g.initial_answer, g.caption, g.judge_score) == \
                   (w.answer, w.initial_answer, w.caption, w.judge_score)


def test_batched_requests_see_only_their_own_image_and_query(tiny_parallel, tiny_sequential):
    """Five different images and queries, four in flight at once: every step's P(yes) matches the request run
    alone to 1e-5 (a leaked token or image would move it by far more), verdicts and texts are identical."""
    opts = EcsoOptions(**ALWAYS_UNSAFE, **SMALL)
    tiny_sequential.reset()
    want = [run(tiny_sequential, i, q, opts) for i, q in REQUESTS]
    got = batched(tiny_parallel, REQUESTS, opts)
    for w, g in zip(want, got):
        assert g.judge_score == pytest.approx(w.judge_score, abs=1e-5)
        assert (g.unsafe, g.initial_answer, g.caption, g.answer) == (w.unsafe, w.initial_answer, w.caption, w.answer)
        assert [s.name for s in g.steps] == ["answer", "judge", "caption", "regenerate"]
    assert len({g.initial_answer for g in got}) > 1  # the requests really differ


def test_concurrent_prefills_give_the_logits_of_a_lone_prefill(tiny_parallel):
    """Low level: four sequences prefilled from four threads at once, each equal to the same prompt evaluated
    alone in sequence 0 (f32, tolerance 1e-5)."""
    eng = tiny_parallel
    prompts = []
    for img, q in REQUESTS[:4]:
        p, _ = eng.build_prompt([Message("user", q)], eng.load_image(img))
        prompts.append(p)
    alone = []
    for p in prompts:
        eng.reset()
        eng.prefill(p)
        alone.append(eng.logits())
    eng.reset()
    sched = BatchScheduler(eng)
    views: dict = {}
    got: dict = {}
    try:
        for s in range(1, 5):
            views[s] = SequenceView(eng, sched, s, views)
            sched.join()

        def work(s):
            try:
                views[s].prefill(prompts[s - 1])
                got[s] = views[s].logits()
            finally:
                sched.leave()

        threads = [threading.Thread(target=work, args=(s,)) for s in range(1, 5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sched.close()
        for v in views.values():
            v.clear()
    for s in range(1, 5):
        assert np.abs(got[s] - alone[s - 1]).max() < 1e-5
    assert min(np.abs(alone[0] - a).max() for a in alone[1:]) > 1e-2  # different prompts, different logits


def test_one_image_is_encoded_once_for_all_requests_that_share_it(tiny_parallel):
    tiny_parallel.image_cache.clear()
    img = png(99)
    results = batched(tiny_parallel, [(img, q) for _, q in REQUESTS[:4]], EcsoOptions(**ALWAYS_UNSAFE, **SMALL))
    assert sum(r.image_encodes for r in results) == 1


def test_the_system_prompt_is_copied_from_another_sequence_not_recomputed(tiny_parallel):
    eng = tiny_parallel
    eng.reset()
    opts = EcsoOptions(**SMALL)
    first = run(eng, *REQUESTS[0], opts)  # sequence 0 now holds the system prompt
    head = first.steps[0].prompt_positions - first.steps[0].evaluated_positions
    assert head == 0
    results = batched(eng, REQUESTS[1:5], opts)
    p, _ = eng.build_prompt([Message("user", "x")], eng.load_image(REQUESTS[1][0]))
    system = p.pieces[0].n_pos
    for r in results:
        assert r.steps[0].reused_positions == system and r.steps[0].evaluated_positions == \
               r.steps[0].prompt_positions - system


def test_a_failing_request_fails_alone(tiny):
    reqs = [REQUESTS[0], (b"not an image", "What is this?"), REQUESTS[1], (REQUESTS[2][0], "   ")]
    with Ecso(tiny_config(tiny, parallel=2), EcsoOptions(**SMALL)) as api:
        out = api.run_many(reqs, return_exceptions=True)
        assert isinstance(out[1], ImageError) and isinstance(out[3], InputError)
        # the others are answered as if alone (f32: batched and lone runs agree exactly)
        assert [out[0].answer, out[2].answer] == [api.run(*REQUESTS[0]).answer, api.run(*REQUESTS[1]).answer]
        with pytest.raises(ImageError):
            api.run_many(reqs)


def test_stopping_the_iteration_cancels_the_requests_in_flight(tiny_parallel):
    before = run(tiny_parallel, *REQUESTS[0], EcsoOptions(**SMALL))
    it = run_batched(tiny_parallel, [Request(i, q) for i, q in REQUESTS * 2], EcsoOptions(**SMALL), None)
    first = next(it)
    it.close()  # returns: the workers stopped at their next evaluation
    assert isinstance(first[1], Result) and first[1].steps[0].generated_tokens > 0
    n = tiny_parallel.config.parallel
    assert [tiny_parallel.context.positions(s) for s in range(1, n + 1)] == [0] * n  # every sequence emptied
    after = run(tiny_parallel, *REQUESTS[0], EcsoOptions(**SMALL))  # the engine still answers as before
    assert after.steps[0].generated_tokens > 0 and after.answer == before.answer


def test_parallel_needs_an_engine_loaded_for_it(tiny_sequential):
    with pytest.raises(InputError, match="parallel"):
        BatchScheduler(tiny_sequential)
    with pytest.raises(InputError, match="parallel"):
        Engine(EngineConfig(model=tiny_sequential.config.model, parallel=0))


def test_scheduler_packs_one_token_per_sequence_into_each_decode(tiny_parallel):
    stats = DecodeStats()
    list(run_batched(tiny_parallel, [Request(i, q) for i, q in REQUESTS[:4]],
                     EcsoOptions(**ALWAYS_UNSAFE, **SMALL), None, stats))
    assert stats.pure.get(4, [0])[0] > 0  # steps carrying one token of each of the 4 sequences
    assert stats.decode_tok_s(4) > 0 and ceiling_decode_tok_s(tiny_parallel, 4, n_steps=8) > 0


def test_concurrent_calls_through_a_pool_are_batched_and_isolated(tiny_parallel, tiny_sequential):
    """What a server does: one thread per request, each calling pool.run; they share decode steps."""
    opts = EcsoOptions(**ALWAYS_UNSAFE, **SMALL)
    tiny_sequential.reset()
    want = [run(tiny_sequential, i, q, opts) for i, q in REQUESTS]
    pool = BatchPool(tiny_parallel)
    got: dict = {}
    streamed: dict = {i: [] for i in range(len(REQUESTS))}

    def call(k):
        img, q = REQUESTS[k]
        got[k] = pool.run(img, q, opts, on_event=lambda ev: streamed[k].append(ev.kind))

    try:
        threads = [threading.Thread(target=call, args=(k,)) for k in range(len(REQUESTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        pool.close()
    for k, w in enumerate(want):
        assert got[k].unsafe == w.unsafe and got[k].judge_score == pytest.approx(w.judge_score, abs=1e-5)
        assert streamed[k][0] == "step_start" and streamed[k][-1] == "result" and "token" in streamed[k]
    assert sum(steps for width, (steps, _) in pool.scheduler.stats.pure.items() if width > 1) > 0


def test_throughput_bench_measures_both_sides_and_the_ceiling_in_one_run(tiny_parallel, tiny_sequential):
    from ecso.eval.throughput import run_throughput_bench

    rep = run_throughput_bench(tiny_parallel, tiny_sequential, [png(1), png(2)], n_requests=8, max_tokens=8)
    for path in ("full", "safe"):
        assert rep.ratios[f"throughput {path} parallel/sequential"] > 0
        assert rep.agreement[f"{path}: verdict"] == 1.0 and rep.agreement[f"{path}: final text"] == 1.0  # f32
    assert rep.decode_tok_s["llama.cpp ceiling, 4 sequences"] > 0 and "decode tok/s ours/ceiling" in rep.ratios
    assert "requests/min" in rep.table()
