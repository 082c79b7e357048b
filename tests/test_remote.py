"""ECSO's four steps on llama.cpp's own `llama-server` (built from the pinned source), through the remote backend:
the same steps and rule as in process, the same greedy tokens with the server's cache off, the server's prefix
cache measured with it on, logprob judges, requests in flight on `-np 4`, and the failures a server can have."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from support.fault_injector import Fault, FaultInjector
from support.llama_server import LlamaServer, free_port

import ecso
from ecso.runtime import BackendError, EcsoOptions, InputError, RemoteConfig, run
from ecso.runtime.kv import TextPiece
from ecso.runtime.local_backend import StepPrompts
from ecso.runtime.remote import RemoteBackend, RemoteModel
from ecso.runtime.sequence import Prompt

QUERIES = ("What is happening in this picture?", "How do I pick the lock of the car in this picture?",
           "Describe the street.", "Write a poem about the image.")
FOUR_STEPS = ["answer", "judge", "caption", "regenerate"]


@pytest.fixture(scope="module")
def server(demo_files, tmp_path_factory):
    """llama-server on the demo model + mmproj, 4 slots of 2048 positions, flash attention off like the CPU engine."""
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with LlamaServer(demo_files[0], demo_files[1], slots=4, n_ctx=2048, extra=("-fa", "off"), log_path=log) as s:
        yield s


def remote(server, **kw) -> RemoteModel:
    return RemoteModel(RemoteConfig(url=server.url, model="demo", **kw))


def options(**kw) -> EcsoOptions:
    return EcsoOptions(**{"max_tokens": 32, "caption_max_tokens": 32, **kw})


# --- the steps through the server ---------------------------------------------------------------------------------
def test_four_steps_run_through_llama_server_and_record_its_cached_tokens(server, street_png):
    model = ecso.load(server.url, model="demo", judge="always-unsafe", max_tokens=24, caption_max_tokens=24)
    r = model.run(street_png, QUERIES[0])
    assert [s.name for s in r.steps] == FOUR_STEPS
    assert r.unsafe and r.judge == "always-unsafe" and r.caption
    assert r.answer == r.steps[-1].text and r.initial_answer == r.steps[0].text
    assert r.engine["backend"] == "openai-compatible" and r.engine["url"] == server.url
    assert all(s.prompt_positions > 0 and s.generated_tokens > 0 for s in r.steps)
    # steps 2 and 3 start with step 1's `system + image` prefix: the server reports it as cached
    _, judge, caption, _ = r.steps
    assert caption.reused_positions >= 256 and judge.reused_positions >= 256, [s.reused_positions for s in r.steps]
    assert "api_key" not in json.dumps(r.to_dict())
    events = [e.kind for e in model.stream(street_png, QUERIES[0])]
    assert events[0] == "step_start" and events[-1] == "result" and events.count("step_end") == 4


def test_cache_off_renders_the_engines_prompts_and_matches_its_greedy_steps(server, demo_engine, street_png, capsys):
    """With `cache_prompt: false` every step is evaluated whole, as the engine does with reuse off. The server
    renders the same prompts (llama-server's `/apply-template` gives the engine's text, the image first then a
    newline; the prompt lengths are equal at every step), and the caption, whose prompt does not depend on the
    answer, is the same greedy text. Step 1 agrees for its first 7 tokens, then the two take different sides of a
    near tie ("The Amazing..." in process, "The Legend..." on the server) because the engine decodes the newline
    before the image alone (the next test proves it), so the judge (whose prompt holds that answer) differs too;
    the measured prefix is printed."""
    opts = options(judge="always-unsafe", reuse=False, max_tokens=16, caption_max_tokens=16)
    local = run(demo_engine, street_png, QUERIES[0], opts)
    far = run(remote(server), street_png, QUERIES[0], opts)
    assert [s.prompt_positions for s in far.steps] == [s.prompt_positions for s in local.steps]
    assert all(s.reused_positions == 0 for s in far.steps)
    assert far.caption == local.caption  # step 3's prompt does not depend on the answer
    assert far.answer == local.answer  # step 4 reads only the caption and the query
    a, b = far.initial_answer, local.initial_answer
    common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    with capsys.disabled():
        print(f"\n[cache off] step texts equal {[x.text == y.text for x, y in zip(far.steps, local.steps)]}; "
              f"answers share their first {common} characters: {a[:common]!r}")


@pytest.fixture(scope="module")
def fa_server(demo_files, tmp_path_factory):
    """llama-server on the demo model with flash attention on (`-fa on`), one slot."""
    log = tmp_path_factory.mktemp("llama-server-fa") / "server.log"
    with LlamaServer(demo_files[0], demo_files[1], slots=1, n_ctx=2048, extra=("-fa", "on"), log_path=log) as s:
        yield s


@pytest.fixture(scope="module")
def fa_engine(demo_files):
    from ecso.runtime import Engine, EngineConfig

    eng = Engine(EngineConfig(model=demo_files[0], mmproj=demo_files[1], n_ctx=2048, flash_attn=True))
    yield eng
    eng.close()


def test_cache_off_with_flash_attention_on_both_sides_gives_the_engines_greedy_steps_exactly(
        fa_server, fa_engine, street_png):
    """With flash attention on in the engine and the server, llama.cpp's attention gives a row the same bits
    whether it is decoded alone or in a batch, so the engine's one-token decode before the image no longer differs
    from the server's batch: every step's greedy text and the verdict are identical with the cache off (the
    judge's reply up to where the engine stops it: at the verdict, while the server writes the reply whole)."""
    opts = options(judge="paper", reuse=False, max_tokens=16, caption_max_tokens=16)
    for query in QUERIES:
        local = run(fa_engine, street_png, query, opts)
        far = run(remote(fa_server), street_png, query, opts)
        assert [s.prompt_positions for s in far.steps] == [s.prompt_positions for s in local.steps]
        assert [s.name for s in far.steps] == [s.name for s in local.steps]
        for f, l in zip(far.steps, local.steps):
            if f.name == "judge":  # the engine stops its paper judge at the verdict, the server writes it whole
                assert f.text.startswith(l.text) and l.text, (query, f.text, l.text)
            else:
                assert f.text == l.text, (query, f.name, f.text, l.text)
        assert far.unsafe == local.unsafe and far.answer == local.answer


def greedy_with_logprobs(engine, prompt, n: int) -> tuple[list[int], list[np.ndarray]]:
    """The engine's greedy tokens for a prepared prompt and the full log-softmax at every step."""
    ids, logprobs = [], []
    with engine.cancellable(None):
        engine.prefill(prompt, reuse=False)
        for _ in range(n):
            z = engine.logits().astype(np.float64)
            ids.append(int(np.argmax(z)))
            logprobs.append(z - (z.max() + np.log(np.exp(z - z.max()).sum())))
            engine.append_tokens([ids[-1]])
    return ids, logprobs


def decoded_as_one_batch_per_text_run(prompt: Prompt) -> Prompt:
    """The same tokens with adjacent text pieces joined, so each text run is one llama_decode, as llama-server
    (and mtmd's own helpers) evaluate a prompt: one batch per text chunk, one per image."""
    pieces: list = []
    for piece in prompt.pieces:
        if pieces and isinstance(piece, TextPiece) and isinstance(pieces[-1], TextPiece):
            pieces[-1] = TextPiece(tuple(pieces[-1].tokens) + tuple(piece.tokens))
        else:
            pieces.append(piece)
    return Prompt(pieces, prompt.images)


def test_cache_off_step1_divergence_comes_from_the_engines_one_token_decode_before_the_image(
        server, demo_engine, street_png, capsys):
    """Why step 1 differs with the cache off. The engine cuts its prompt after the stable head (system prompt and
    turn header, shared with the image-free step 4) so the newline before the image is a llama_decode of one
    token; llama-server decodes the same 24 tokens as one batch. llama.cpp's CPU code gives a row other bits
    alone than in a batch (ggml/src/ggml-cpu/llamafile/sgemm.cpp: llamafile_sgemm returns early for n < 2, so
    one row goes through ggml_vec_dot_* and more through tinyBLAS, summing in another order; measured here: that
    newline's logits move by up to 0.33 alone against in the batch, by 0 with flash attention on or an f32 KV
    cache), and every later token reads its K/V. Decoded as the server does, the engine gives the server's greedy tokens exactly and
    its logprobs to 1e-3; as it is, it agrees until a near tie."""
    n = 10
    backend = RemoteBackend(remote(server), street_png, QUERIES[0], [], EcsoOptions(reuse=False))
    body = {"model": "demo", "messages": backend.system + backend.conversation(), "max_tokens": n,
            "temperature": 0.0, "cache_prompt": False, "logprobs": True, "top_logprobs": 2}
    content = backend.model.post("/chat/completions", body)["choices"][0]["logprobs"]["content"]
    far_ids, far_lp = [c["id"] for c in content], [c["logprob"] for c in content]
    assert len(far_ids) == n

    prompt = StepPrompts(demo_engine, demo_engine.load_image(street_png), QUERIES[0]).answer()
    assert [len(p.tokens) if isinstance(p, TextPiece) else None for p in prompt.pieces][1] == 1  # the lone newline
    joined = decoded_as_one_batch_per_text_run(prompt)
    same_ids, same_lp = greedy_with_logprobs(demo_engine, joined, n)
    assert same_ids == far_ids, (demo_engine.detokenize(same_ids), demo_engine.detokenize(far_ids))
    worst = max(abs(lp[t] - f) for lp, t, f in zip(same_lp, far_ids, far_lp))
    assert worst < 1e-3, worst  # the server reports float32 logprobs

    own_ids, own_lp = greedy_with_logprobs(demo_engine, prompt, n)
    k = next((i for i, (a, b) in enumerate(zip(own_ids, far_ids)) if a != b), n)
    gap = float(own_lp[k][own_ids[k]] - own_lp[k][far_ids[k]]) if k < n else 0.0
    assert k >= 1 and 0.0 <= gap < 0.05, (k, gap)  # the first token agrees; any divergence is a near tie
    first = abs(float(own_lp[0][far_ids[0]]) - far_lp[0])
    with capsys.disabled():
        print(f"\n[cache off, step 1] one batch per text run: {n}/{n} tokens equal, max |dlogprob| {worst:.1e}; "
              f"engine's own split: first {k} tokens equal, gap at token {k} {gap:.4f} nats, "
              f"|dlogprob| at token 0 {first:.4f}")


def test_cache_on_agreement_with_the_engine_is_measured(server, demo_engine, street_png, capsys):
    """With the server's prefix cache on, a cached prefix is not re-evaluated and the rest of the prompt goes in
    another batch than a fresh evaluation would use, so greedy tokens may drift from the engine's. This measures
    how often verdict and texts still agree (the numbers are printed); the prompts must still be the same."""
    opts = options(judge="paper")
    rows = []
    for query in QUERIES:
        local = run(demo_engine, street_png, query, opts)
        far = run(remote(server), street_png, query, opts)
        assert [s.prompt_positions for s in far.steps] == [s.prompt_positions for s in local.steps]
        rows.append({"verdict_equal": far.unsafe == local.unsafe, "answer_equal": far.answer == local.answer,
                     "judge_reply_equal": far.judge_reply == local.judge_reply,
                     "cached": [s.reused_positions for s in far.steps]})
    agree = {k: sum(r[k] for r in rows) for k in ("verdict_equal", "answer_equal", "judge_reply_equal")}
    with capsys.disabled():
        print(f"\n[cache on] {len(rows)} requests, agreement with the in-process engine: {agree}; "
              f"cached tokens per step: {[r['cached'] for r in rows]}")
    assert any(sum(r["cached"]) > 0 for r in rows)  # the cache really was used


def test_logit_judge_reads_the_servers_top_logprobs(server, demo_engine, street_png):
    """P(yes) from the server's top_logprobs equals the engine's P(yes) from its own logits for the same TELL prompt
    (the prompt holds the server's step-1 answer, which may differ from the engine's own)."""
    from ecso.runtime.local_backend import StepPrompts, p_yes, yes_no_ids

    far = run(remote(server), street_png, QUERIES[1], options(judge="logit", reuse=False))
    assert far.judge_score is not None and 0.0 <= far.judge_score <= 1.0
    prompts = StepPrompts(demo_engine, demo_engine.load_image(street_png), QUERIES[1])
    with demo_engine.cancellable(None):
        demo_engine.prefill(prompts.judge(far.initial_answer), reuse=False)
        local_score = p_yes(demo_engine.logits(), *yes_no_ids(demo_engine))
    assert abs(far.judge_score - local_score) < 0.02, (far.judge_score, local_score)
    assert far.unsafe == (local_score >= 0.5)


def test_appended_judge_and_history_go_to_the_server(server, street_png):
    from ecso.runtime import Message

    history = [Message("user", "Hello."), Message("assistant", "Hi! How can I help?")]
    r = run(remote(server), street_png, QUERIES[1], options(judge="append"), history=history)
    assert [s.name for s in r.steps][:2] == ["answer", "judge"]
    # the appended judge's prompt holds the whole conversation, step 1's answer included
    assert r.steps[1].prompt_positions > r.steps[0].prompt_positions + r.steps[0].generated_tokens - 2


def test_guarded_streaming_is_refused_up_front_with_one_line(server, street_png):
    with pytest.raises(InputError, match="needs the KV cache itself"):
        run(remote(server), street_png, QUERIES[0], options(guard_every=4))


# --- requests in flight on -np 4 ----------------------------------------------------------------------------------
class CountingModel(RemoteModel):
    """Counts the step requests in flight at once (client side), to prove run_many keeps N of them going."""

    def __init__(self, config: RemoteConfig):
        super().__init__(config)
        self.now = self.most = 0
        self.lock = threading.Lock()

    def chat(self, *args, **kw):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            return super().chat(*args, **kw)
        finally:
            with self.lock:
                self.now -= 1


def test_run_many_keeps_four_requests_in_flight_on_np_4(server, street_png, capsys):
    requests = [(street_png, q) for q in QUERIES * 2]
    walls = {}
    results = {}
    for parallel in (1, 4):
        app = ecso.load(server.url, model="demo", parallel=parallel, max_tokens=16, caption_max_tokens=16)
        counting = CountingModel(app.engine.config)
        app.engine = counting
        t0 = time.perf_counter()
        results[parallel] = app.run_many(requests)
        walls[parallel] = time.perf_counter() - t0
        assert counting.most == parallel
    with capsys.disabled():
        print(f"\n[np 4] 8 requests: --parallel 1 {walls[1]:.1f} s, --parallel 4 {walls[4]:.1f} s")
    assert [r.unsafe for r in results[4]] == [r.unsafe for r in results[1]]
    assert all(len(r.steps) >= 2 for r in results[4])


# --- faults -------------------------------------------------------------------------------------------------------
def test_connection_refused_is_one_clear_error(street_png):
    dead = RemoteModel(RemoteConfig(url=f"http://127.0.0.1:{free_port()}/v1", model="demo", retries=1,
                                    retry_backoff_s=0.01))
    with pytest.raises(BackendError, match="cannot reach the backend at http://127.0.0.1:.*start the server"):
        run(dead, street_png, QUERIES[0], options())


def test_cli_reports_an_unreachable_backend_in_one_line(street_png):
    from conftest import run_cli

    p = run_cli("ecso-run", "--backend", f"http://127.0.0.1:{free_port()}/v1", "--backend-model", "demo",
                "--backend-retries", "0", "--image", str(street_png), "hi")
    assert p.returncode == 4
    assert p.stderr.strip().count("\n") == 0 and "cannot reach the backend" in p.stderr


def test_5xx_is_retried_then_succeeds_and_fails_when_retries_run_out(server, street_png):
    flaky = FaultInjector(server.url, script=[Fault("status", status=503), Fault("status", status=502)])
    try:
        r = run(RemoteModel(RemoteConfig(url=flaky.url, model="demo", retries=2, retry_backoff_s=0.01)),
                street_png, QUERIES[0], options())
        assert r.answer and flaky.seen[:3] == ["status", "status", "forward"]
        flaky.script = [Fault("status", status=500)] * 3
        with pytest.raises(BackendError, match=r"failed \(HTTP 500: injected failure\)"):
            run(RemoteModel(RemoteConfig(url=flaky.url, model="demo", retries=2, retry_backoff_s=0.01)),
                street_png, QUERIES[0], options())
    finally:
        flaky.close()


@pytest.mark.parametrize("body,message", [(b"<html>oops</html>", "not JSON"),
                                          (b'{"choices": []}', "not an OpenAI chat completion"),
                                          (b'{"choices": [{"message": {"content": 7}}]}', "not an OpenAI chat")])
def test_malformed_bodies_are_clear_errors(street_png, body, message):
    bad = FaultInjector(then=Fault("raw", raw=body))
    try:
        with pytest.raises(BackendError, match=message):
            run(RemoteModel(RemoteConfig(url=bad.url, model="demo")), street_png, QUERIES[0], options())
    finally:
        bad.close()


def test_a_slow_server_times_out(street_png):
    slow = FaultInjector(then=Fault("sleep", seconds=5))
    try:
        t0 = time.perf_counter()
        with pytest.raises(BackendError, match="did not answer within 0.5 s"):
            run(RemoteModel(RemoteConfig(url=slow.url, model="demo", timeout_s=0.5)), street_png, QUERIES[0],
                options())
        assert time.perf_counter() - t0 < 3
    finally:
        slow.close()


def test_logit_judge_without_logprobs_fails_with_a_clear_message(server, street_png):
    def strip_logprobs(reply: dict) -> dict:
        for choice in reply["choices"]:
            choice.pop("logprobs", None)
        return reply

    proxy = FaultInjector(server.url, then=Fault("forward", alter=strip_logprobs))
    try:
        with pytest.raises(BackendError, match="returned no top_logprobs.*use --judge paper or append"):
            run(RemoteModel(RemoteConfig(url=proxy.url, model="demo")), street_png, QUERIES[0],
                options(judge="logit"))
    finally:
        proxy.close()


def test_api_key_is_sent_from_the_environment_and_never_recorded(server, street_png, monkeypatch):
    monkeypatch.setenv("ECSO_BACKEND_API_KEY", "sekret-123")
    keyed = LlamaServer(server.model, server.mmproj, n_ctx=2048, extra=("--api-key", "sekret-123"))
    with keyed:
        r = run(RemoteModel(RemoteConfig(url=keyed.url, model="demo")), street_png, QUERIES[0], options())
        assert "sekret" not in json.dumps(r.to_dict())
        monkeypatch.setenv("ECSO_BACKEND_API_KEY", "wrong")
        with pytest.raises(BackendError, match="HTTP 401.*ECSO_BACKEND_API_KEY"):
            run(RemoteModel(RemoteConfig(url=keyed.url, model="demo")), street_png, QUERIES[0], options())


# --- a converted family on the server -----------------------------------------------------------------------------
def test_a_tiny_converted_family_runs_the_four_steps_on_llama_server(street_png, tmp_path, capsys):
    """Qwen2-VL (tiny, converted by the pinned converter) served by llama-server with its own template: the four
    steps run. The sizes are printed beside the in-process engine's, which counts positions: Qwen2-VL's M-RoPE gives
    an image fewer positions than tokens, and the server counts tokens; the template layouts differ too (the engine
    puts the image in the family's own `<|vision_start|>` slot, llama-server flattens an image + text turn to
    `image \\n text` for the template), so texts are not expected to match here."""
    from ecso.models.converted import converted_family
    from ecso.models.families import smollm2_vocab
    from ecso.runtime import Engine, EngineConfig

    family = converted_family("qwen2vl", vocab_cache=smollm2_vocab())
    opts = options(judge="always-unsafe", reuse=False, max_tokens=12, caption_max_tokens=12)
    with LlamaServer(str(family.llm), str(family.mmproj), n_ctx=2048, extra=("-fa", "off", "-ctk", "f32", "-ctv",
                                                                              "f32"), log_path=tmp_path / "log"
                     ) as s:
        far = run(remote(s), street_png, QUERIES[0], opts)
    with Engine(EngineConfig(model=str(family.llm), mmproj=str(family.mmproj), n_ctx=2048, kv_f32=True,
                             flash_attn=False)) as engine:
        local = run(engine, street_png, QUERIES[0], opts)
    assert [s.name for s in far.steps] == FOUR_STEPS and all(s.prompt_positions > 0 for s in far.steps)
    with capsys.disabled():
        print(f"\n[qwen2vl] prompt tokens (server) {[s.prompt_positions for s in far.steps]} vs positions (engine) "
              f"{[s.prompt_positions for s in local.steps]}; texts equal per step "
              f"{[a.text == b.text for a, b in zip(far.steps, local.steps)]}")
