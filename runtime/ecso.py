"""ECSO's four steps, top to bottom, on the Engine primitives.

1. answer the query with the image;  2. the same model judges its answer (TELL);
3. if unsafe: a query-aware caption of the image (CAP);  4. answer again from query + caption, without the image (GEN).

With reuse on, steps 1-3 share the KV prefix `system + image` and step 4 shares `system`; the image is encoded at
most once per request and not at all when the embedding cache already holds it. Options beyond the paper (logit
judge, appended judge, loose "contains yes" rule, guarded streaming) are off by default and recorded in the Result.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Protocol, Sequence

import numpy as np

from ecso.runtime.engine import Engine, EngineConfig, Generation, PrefillStats, Prompt, Sampler, Sampling
from ecso.runtime.errors import Cancelled, EcsoError, InputError
from ecso.runtime.images import ImageSource, LoadedImage
from ecso.runtime.kv import TextPiece, aligned_to
from ecso.runtime.prompts import (APPEND_JUDGE_PROMPT, DECISION_RULES, LOGIT_NO, LOGIT_YES, PROMPT_VERSION,
                                  TELL_RESPONSE_CHARS, Message, cap_prompt, gen_prompt, is_unsafe_reply,
                                  reply_can_still_be_unsafe, tell_prompt)

# always-unsafe: for demonstrations and tests of the unsafe path: the paper's judge runs and its reply is recorded,
# but the verdict is always unsafe, so steps 3 and 4 always run (Result.judge says "always-unsafe")
JUDGES = ("paper", "logit", "append", "append-logit", "always-unsafe")


@dataclass(frozen=True)
class EcsoOptions:
    """Per-request settings. Defaults are the paper's method, greedy, with KV reuse."""

    judge: str = "paper"  # paper: fresh TELL prompt + generated reply; logit: TELL + P(yes) from one step;
    # append / append-logit: the judge question appended to the running conversation (cheapest)
    decision_rule: str = "exact"  # exact: reply is "yes"/"yes." (paper); contains: any "yes" in the reply
    logit_threshold: float = 0.5  # logit judges: unsafe iff P(yes) / (P(yes) + P(no)) >= threshold
    max_tokens: int = 512  # answer (step 1) and regenerated answer (step 4); the paper allows 1024-2048
    judge_max_tokens: int = 16  # a reply longer than "yes." is safe under the exact rule anyway
    judge_early_stop: bool = True  # exact rule: stop the reply once it can no longer be "yes"/"yes." (same verdict)
    caption_max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    reuse: bool = True  # False: every step clears the KV cache and re-encodes the image (the naive way)
    defense: bool = True  # False: step 1 only (the undefended baseline, same engine)
    guard_every: int = 0  # guarded streaming: judge the partial answer every N tokens (0: off)
    guard_threshold: float = 0.5
    # the conversation's system prompt in every step's prompt (1-4), as ECSO's released scripts use one conversation
    # template for all four; None: the chat format's default system prompt (and a system message in `history`)
    system_prompt: Optional[str] = None

    def validate(self) -> None:
        if self.judge not in JUDGES:
            raise InputError(f"unknown judge {self.judge!r}; use one of {', '.join(JUDGES)}")
        if self.decision_rule not in DECISION_RULES:
            raise InputError(f"unknown decision rule {self.decision_rule!r}; use one of {', '.join(DECISION_RULES)}")
        if min(self.max_tokens, self.judge_max_tokens, self.caption_max_tokens) < 1:
            raise InputError("max token counts must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise InputError("temperature must be >= 0 and top_p in (0, 1]")
        if self.guard_every < 0:
            raise InputError("guard_every must be >= 0")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise InputError("system_prompt must be a string (or None for the chat format's default)")


@dataclass
class StepTrace:
    """One step as it ran: how much of its prompt came from the KV cache, what it produced, how long it took."""

    name: str  # answer | judge | guard | caption | regenerate
    prompt_positions: int = 0
    reused_positions: int = 0
    evaluated_positions: int = 0
    generated_tokens: int = 0
    image_encodes: int = 0
    prefill_seconds: float = 0.0
    generate_seconds: float = 0.0
    finish_reason: str = ""
    text: str = ""
    path: str = "llm"  # "llm" (the model itself) or "head:<name>@<execution provider>" (an ONNX head)

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.generate_seconds


@dataclass
class Result:
    answer: str  # what to show the user
    unsafe: bool  # the judge flagged the first answer
    initial_answer: str  # step 1's answer (the unsafe one when unsafe)
    judge: str
    judge_reply: str
    judge_score: Optional[float]  # P(yes) for logit judges and the guard
    caption: Optional[str]
    retracted: bool  # guarded streaming stopped the answer midway
    steps: list[StepTrace]
    image_encodes: int
    image_cache_hit: bool
    seconds: float
    prompt_version: str = PROMPT_VERSION
    decision_rule: str = "exact"
    options: dict = field(default_factory=dict)
    engine: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        for s, st in zip(d["steps"], self.steps):
            s["seconds"] = st.seconds
        return d


@dataclass
class StepEvent:
    """What `stream` yields: a step starts / ends, answer text arrives, an answer is retracted, or the result."""

    kind: str  # step_start | token | step_end | retract | result
    step: str = ""
    text: str = ""
    trace: Optional[StepTrace] = None
    result: Optional[Result] = None


class JudgeHead(Protocol):
    """A fast step-2 replacement (runtime/heads.py): predicts the self-judge's verdict from (query, response)."""

    name: str

    def judge(self, query: str, response: str): ...  # -> object with unsafe, score, provider, seconds


class CaptionHead(Protocol):
    """A fast step-3 replacement (runtime/heads.py): a caption (or OCR text) of the image."""

    name: str

    def caption(self, image: LoadedImage, query: str): ...  # -> object with text, provider, seconds


@dataclass(frozen=True)
class Heads:
    """Optional ONNX heads that replace steps 2 and/or 3; None keeps the model's own step."""

    judge: Optional[JudgeHead] = None
    caption: Optional[CaptionHead] = None


def run(engine: Engine, image: Optional[ImageSource], query: str, options: EcsoOptions = EcsoOptions(),
        on_event: Optional[Callable[[StepEvent], None]] = None, heads: Heads = Heads(),
        history: Sequence[Message] = (), should_cancel: Optional[Callable[[], bool]] = None) -> Result:
    """Runs ECSO for one request; `on_event` receives StepEvents as they happen (used by `stream`).
    `should_cancel`: checked between decode batches, tokens and steps; True stops the request with `Cancelled`.

    `history`: earlier turns of a conversation (system / user / assistant), sent before `query` in step 1 and to
    the appended judges; the image goes first in the first user turn (LLaVA style). The paper's TELL / CAP / GEN
    prompts stay single-turn."""
    with engine.cancellable(should_cancel):  # holds the engine lock for the whole request
        return prepare_request(engine, image, query, options, on_event, heads, history).run()


def prepare_request(engine: Engine, image: Optional[ImageSource], query: str, options: EcsoOptions,
                    on_event: Optional[Callable[[StepEvent], None]], heads: Heads,
                    history: Sequence[Message]) -> "_Request":
    """Checks the inputs and loads the image: a request ready to run on `engine`, or on a batch sequence that
    behaves like one (runtime/batch.py)."""
    options.validate()
    emit = on_event or (lambda ev: None)
    if not isinstance(query, str) or not query.strip():
        raise InputError("the query is empty; give a question about the image")
    if len(query) > engine.config.max_query_chars:
        raise InputError(f"the query has {len(query)} characters, over the limit of {engine.config.max_query_chars}")
    t_start = time.perf_counter()
    loaded = engine.load_image(image) if image is not None else None
    cache_hit = loaded is not None and engine.has_encoded(loaded)
    if options.system_prompt is not None and any(m.role == "system" for m in history):
        raise InputError("give the system prompt once: EcsoOptions.system_prompt or a system message in the history")
    prompts = StepPrompts(engine, loaded, query, history, options.system_prompt)
    return _Request(engine, prompts, options, emit, cache_hit, t_start, heads)


def stream(engine: Engine, image: Optional[ImageSource], query: str,
           options: EcsoOptions = EcsoOptions(), heads: Heads = Heads(),
           history: Sequence[Message] = ()) -> Iterator[StepEvent]:
    """Yields StepEvents (answer tokens as they are generated) and finally a `result` event.
    The request runs in a worker thread holding the engine lock; if the consumer stops iterating (or closes the
    generator), the worker is cancelled at its next decode batch or token and the lock is released."""
    import queue
    import threading

    q: queue.Queue = queue.Queue()
    stop = threading.Event()
    error: list[BaseException] = []

    def on_event(ev: StepEvent) -> None:
        if stop.is_set():
            raise _Cancelled()
        q.put(ev)

    def work() -> None:
        try:
            run(engine, image, query, options, on_event, heads, history, should_cancel=stop.is_set)
        except (_Cancelled, Cancelled):
            pass
        except BaseException as e:  # re-raised in the consumer
            error.append(e)
        finally:
            q.put(None)

    t = threading.Thread(target=work, name="ecso-stream", daemon=True)
    t.start()
    try:
        while True:
            ev = q.get()
            if ev is None:
                break
            yield ev
    finally:
        stop.set()
        t.join()
    if error:
        raise error[0]


class _Cancelled(Exception):
    """The stream's consumer went away."""


class StepPrompts:
    """The prompt of every ECSO step of one request, tokenized as the reference does (`Engine.build_prompt`).

    Every text inserted into a prompt (the query, history turns, the model's answer, the caption) is neutralised
    first, so no user or model text can ever become a control token such as `</s>` or `<|im_end|>`."""

    def __init__(self, engine: Engine, image: Optional[LoadedImage], query: str, history: Sequence[Message] = (),
                 system_prompt: Optional[str] = None):
        self.e, self.image = engine, image
        self.query = engine.clean_user_text(query)
        # `system_prompt` opens every step's prompt (None: the chat format's default); step 1 and the appended
        # judges then continue with the history
        self.system = [Message("system", engine.clean_user_text(system_prompt))] if system_prompt is not None else []
        self.history = self.system + [Message(m.role, engine.clean_user_text(m.content)) for m in history]

    def _user(self, text: str) -> list[Message]:
        return [Message("user", text)]

    def answer(self) -> Prompt:
        """Step 1: the conversation and the query, with the image."""
        return self.e.build_prompt(self.history + self._user(self.query), self.image)[0]

    def judge(self, answer: str) -> Prompt:
        """Step 2 (paper / logit judge): TELL with the query and the answer, with the image."""
        answer = self.e.clean_user_text(answer[:TELL_RESPONSE_CHARS])
        return self.e.build_prompt(self.system + self._user(tell_prompt(self.query, answer)), self.image)[0]

    def caption(self) -> Prompt:
        """Step 3: CAP, the query-aware caption request, with the image."""
        return self.e.build_prompt(self.system + self._user(cap_prompt(self.query)), self.image)[0]

    def regenerate(self, caption: str) -> Prompt:
        """Step 4: GEN from the caption and the query, without the image."""
        msgs = self.system + self._user(gen_prompt(self.e.clean_user_text(caption), self.query))
        return self.e.build_prompt(msgs, None)[0]

    def appended(self, answer_prompt: Prompt, answer_tokens: Sequence[int], answer: str, question: str) -> Prompt:
        """Step 2 (append judges): the whole conversation, step 1's answer included, plus `question` as a new user
        turn, tokenized as the reference tokenizes it. Batched as the cache holds step 1 (its prompt, then one
        decode per generated token), so everything that matches the generated tokens is reused."""
        msgs = self.history + self._user(self.query) + [Message("assistant", self.e.clean_user_text(answer))]
        prompt = self.e.build_prompt(msgs + self._user(question), self.image)[0]
        base = answer_prompt.pieces + [TextPiece((t,)) for t in answer_tokens]
        return Prompt(aligned_to(prompt.pieces, base), prompt.images)

    def continuation(self, question: str) -> list[int]:
        """Tokens that close the assistant turn right after the generated tokens and ask `question` in a new user
        turn (the guard's branch). Raises ChatTemplateError if the template does not echo the answer verbatim."""
        msgs = self.history + self._user(self.query) + [Message("assistant", "")]
        text = self.e.chat_format.after_assistant(msgs + self._user(question), self.image is not None)
        return self.e.tokenize(text, add_special=False)


def yes_no_ids(engine: Engine) -> tuple[list[int], list[int]]:
    """Single-token spellings of yes / no in this vocabulary (for the logit judge)."""
    return engine.single_token_ids(LOGIT_YES), engine.single_token_ids(LOGIT_NO)


def p_yes(logits: np.ndarray, yes: list[int], no: list[int]) -> float:
    """P(yes) / (P(yes) + P(no)) from next-token logits."""
    z = logits.astype(np.float64)
    z = np.exp(z - z.max())
    py, pn = z[yes].sum(), z[no].sum()
    return float(py / (py + pn)) if py + pn > 0 else 0.0


class _Request:
    def __init__(self, engine: Engine, prompts: StepPrompts, opts: EcsoOptions, emit: Callable[[StepEvent], None],
                 cache_hit: bool, t_start: float, heads: Heads):
        self.e, self.prompts, self.o, self.emit, self.heads = engine, prompts, opts, emit, heads
        self.image, self.query = prompts.image, prompts.query
        self.cache_hit, self.t_start = cache_hit, t_start
        self.steps: list[StepTrace] = []

    # --- helpers -------------------------------------------------------------------------------------------
    def sampling(self, max_tokens: int, step: int) -> Sampling:
        return Sampling(self.o.temperature, self.o.top_p, self.o.seed + step, max_tokens)

    def prefill(self, trace: StepTrace, prompt: Prompt, max_tokens: int) -> PrefillStats:
        self.e.check_budget(prompt, max_tokens, f"step '{trace.name}'")
        st = self.e.prefill(prompt, reuse=self.o.reuse)
        trace.prompt_positions += st.n_prompt
        trace.reused_positions += st.n_reused
        trace.evaluated_positions += st.n_evaluated
        trace.image_encodes += st.image_encodes
        trace.prefill_seconds += st.seconds
        return st

    def generate(self, trace: StepTrace, sampling: Sampling, stream_tokens: bool = False,
                 first_token: Optional[int] = None,
                 should_stop: Optional[Callable[[list[int]], bool]] = None,
                 sampler: Optional[Sampler] = None) -> Generation:
        on_text = None
        if stream_tokens:
            def on_text(delta: str) -> None:
                self.emit(StepEvent("token", trace.name, delta))
        g = self.e.generate(sampling, on_text=on_text, first_token=first_token, should_stop=should_stop,
                            sampler=sampler)
        trace.generated_tokens += len(g.tokens)
        trace.generate_seconds += g.seconds
        trace.finish_reason = g.finish_reason
        return g

    def start(self, name: str) -> StepTrace:
        trace = StepTrace(name)
        self.steps.append(trace)
        self.emit(StepEvent("step_start", name))
        return trace

    def end(self, trace: StepTrace, text: str) -> None:
        trace.text = text
        self.emit(StepEvent("step_end", trace.name, text, trace=trace))

    def yes_no(self) -> tuple[list[int], list[int]]:
        ids = yes_no_ids(self.e)
        if not ids[0] or not ids[1]:
            raise InputError("this vocabulary has no single-token yes/no; use --judge paper or append")
        return ids

    # --- steps ---------------------------------------------------------------------------------------------
    def run(self) -> Result:
        o, e = self.o, self.e
        # step 1: the answer, with the image
        trace = self.start("answer")
        p1 = self.prompts.answer()
        self.prefill(trace, p1, o.max_tokens)
        if o.guard_every > 0 and o.defense:
            first, retracted, guard_score = self.guarded_answer(trace, p1)
        else:
            first = self.generate(trace, self.sampling(o.max_tokens, 0), stream_tokens=True)
            retracted, guard_score = False, None
        answer1 = first.text.strip()
        self.end(trace, answer1)
        if not o.defense:
            return self.result(answer1, False, answer1, "", None, None, False)

        if retracted:
            self.emit(StepEvent("retract", "answer", answer1))
            unsafe, reply, score = True, "yes", guard_score
        else:
            unsafe, reply, score = self.judge(p1, first, answer1)
        if not unsafe:
            return self.result(answer1, False, answer1, reply, score, None, False)

        # step 3: query-aware caption, with the image
        caption = ""
        if self.image is not None and self.heads.caption is not None:
            trace = self.start("caption")
            out = self.heads.caption.caption(self.image, self.query)
            trace.path = f"head:{self.heads.caption.name}@{out.provider}"
            trace.generate_seconds = out.seconds
            caption = out.text.strip()
            self.end(trace, caption)
        elif self.image is not None:
            trace = self.start("caption")
            p3 = self.prompts.caption()
            self.prefill(trace, p3, o.caption_max_tokens)
            caption = self.generate(trace, self.sampling(o.caption_max_tokens, 2)).text.strip()
            self.end(trace, caption)

        # step 4: eyes closed - the answer again from query + caption, no image
        trace = self.start("regenerate")
        p4 = self.prompts.regenerate(caption)
        self.prefill(trace, p4, o.max_tokens)
        final = self.generate(trace, self.sampling(o.max_tokens, 3), stream_tokens=True).text.strip()
        self.end(trace, final)
        return self.result(final, True, answer1, reply, score, caption, retracted)

    def judge(self, p1: Prompt, first: Generation, answer1: str) -> tuple[bool, str, Optional[float]]:
        o, e = self.o, self.e
        trace = self.start("judge")
        if self.heads.judge is not None:
            v = self.heads.judge.judge(self.query, answer1)
            trace.path = f"head:{self.heads.judge.name}@{v.provider}"
            trace.generate_seconds = v.seconds
            reply = "yes" if v.unsafe else "no"
            self.end(trace, reply)
            return bool(v.unsafe), reply, float(v.score)
        if o.judge in ("paper", "logit", "always-unsafe"):
            prompt = self.prompts.judge(answer1)
        else:  # append: the question goes after the answer already in the cache
            prompt = self.prompts.appended(p1, first.tokens, answer1, APPEND_JUDGE_PROMPT)
        self.prefill(trace, prompt, 1 if o.judge.endswith("logit") else o.judge_max_tokens)
        if o.judge.endswith("logit"):
            score = p_yes(e.logits(), *self.yes_no())
            unsafe = score >= o.logit_threshold
            reply = "yes" if unsafe else "no"
        else:
            decided = None
            if o.decision_rule == "exact" and o.judge_early_stop:
                def decided(tokens: list[int]) -> bool:  # the reply can no longer be exactly "yes"/"yes."
                    return not reply_can_still_be_unsafe(e.detokenize(tokens), o.decision_rule)
            g = self.generate(trace, self.sampling(o.judge_max_tokens, 1), should_stop=decided)
            if g.finish_reason == "aborted":
                trace.finish_reason = "decided"
            reply = g.text.strip()
            score = None
            unsafe = o.judge == "always-unsafe" or is_unsafe_reply(reply, o.decision_rule)
        self.end(trace, reply)
        return unsafe, reply, score

    def guarded_answer(self, trace: StepTrace, p1: Prompt) -> tuple[Generation, bool, Optional[float]]:
        """Generates the answer in segments of guard_every tokens; after each, branches a logit judge off the
        running answer (append-style), then rolls the judge back. Stops and retracts when it says unsafe."""
        o, e = self.o, self.e
        yes, no = self.yes_no()
        cont = self.prompts.continuation(APPEND_JUDGE_PROMPT)
        tokens: list[int] = []
        first_token: Optional[int] = None
        score: Optional[float] = None
        guard = StepTrace("guard")
        seconds = 0.0
        finish = "length"
        # one sampler for the whole answer: pausing for the guard must not restart its random sequence
        with e.sampler(self.sampling(o.max_tokens, 0)) as sampler:
            while len(tokens) < o.max_tokens:
                n = min(o.guard_every, o.max_tokens - len(tokens))
                g = self.generate(trace, self.sampling(n, 0), stream_tokens=True, first_token=first_token,
                                  sampler=sampler)
                tokens += g.tokens
                seconds += g.seconds
                finish = g.finish_reason
                if g.finish_reason != "length" or len(tokens) >= o.max_tokens:
                    break
                t0 = time.perf_counter()
                first_token = e.sample_next(sampler)
                mark = e.n_past
                if mark + len(cont) + 1 > e.n_ctx:
                    guard.prefill_seconds += time.perf_counter() - t0
                    continue  # no room to branch a judge: keep generating unguarded
                e.append_tokens(cont)
                score = p_yes(e.logits(), yes, no)
                e.rollback(mark)
                guard.prefill_seconds += time.perf_counter() - t0
                guard.evaluated_positions += len(cont)
                guard.generated_tokens += 1
                if score >= o.guard_threshold:
                    self.steps.append(guard)
                    guard.text = f"unsafe at token {len(tokens)} (P(yes)={score:.3f})"
                    return Generation(tokens, e.detokenize(tokens), "aborted", seconds), True, score
        guard.text = "never fired"
        self.steps.append(guard)
        return Generation(tokens, e.detokenize(tokens), finish, seconds), False, score

    def result(self, answer: str, unsafe: bool, initial: str, reply: str, score: Optional[float],
               caption: Optional[str], retracted: bool) -> Result:
        judge = "none" if not self.o.defense else "guard" if retracted else (
            f"head:{self.heads.judge.name}" if self.heads.judge is not None else self.o.judge)
        r = Result(answer=answer, unsafe=unsafe, initial_answer=initial, judge=judge, judge_reply=reply,
                   judge_score=score, caption=caption, retracted=retracted, steps=self.steps,
                   image_encodes=sum(s.image_encodes for s in self.steps), image_cache_hit=self.cache_hit,
                   seconds=time.perf_counter() - self.t_start, decision_rule=self.o.decision_rule,
                   options=asdict(self.o), engine=self.e.describe())
        self.emit(StepEvent("result", "", answer, result=r))
        return r


def _outcome(call: Callable[[], Result]):
    try:
        return call()
    except EcsoError as e:
        return e


class Ecso:
    """The Python API for apps: load once, run many.

        with Ecso(EngineConfig(model="llm.gguf", mmproj="mmproj.gguf")) as ecso:
            result = ecso.run("photo.png", "What should I do with this?")
            for event in ecso.stream("photo.png", "..."):
                ...

    Thread-safe: `run` calls are serialised by the engine lock (one model, one request at a time); `run_many` on
    an engine loaded with `EngineConfig(parallel=N)` decodes N requests together.
    """

    def __init__(self, config: EngineConfig, options: EcsoOptions = EcsoOptions(), heads: Heads = Heads()):
        self.engine = Engine(config)
        self.options = options
        self.heads = heads

    def _opts(self, options: Optional[EcsoOptions], overrides: dict) -> EcsoOptions:
        from dataclasses import replace

        return replace(options or self.options, **overrides)

    def run(self, image: Optional[ImageSource], query: str, options: Optional[EcsoOptions] = None,
            history: Sequence[Message] = (), **overrides) -> Result:
        return run(self.engine, image, query, self._opts(options, overrides), heads=self.heads, history=history)

    def run_many(self, requests: Iterable, options: Optional[EcsoOptions] = None, return_exceptions: bool = False,
                 **overrides) -> list:
        """Results of many requests (`batch.Request`s or (image, query) pairs), in order. With an engine loaded
        with `parallel=N` (N > 1), N requests are decoded together (runtime/batch.py); otherwise one after another,
        exactly as `run`. A failed request raises its EcsoError, or with return_exceptions is returned in its place."""
        from ecso.runtime.batch import Request, run_batched

        reqs = [r if isinstance(r, Request) else Request(*r) for r in requests]
        opts = self._opts(options, overrides)
        out: list = [None] * len(reqs)
        if self.engine.config.parallel > 1:
            outcomes: Iterable = run_batched(self.engine, reqs, opts, self.heads)
        else:
            outcomes = ((i, _outcome(lambda r=r: run(self.engine, r.image, r.query, r.options or opts,
                                                     heads=self.heads, history=r.history)))
                        for i, r in enumerate(reqs))
        with contextlib.closing(iter(outcomes)) as it:  # an error stops the batch now, not when collected
            for i, outcome in it:
                if isinstance(outcome, BaseException) and not (return_exceptions and isinstance(outcome, EcsoError)):
                    raise outcome
                out[i] = outcome
        return out

    def stream(self, image: Optional[ImageSource], query: str, options: Optional[EcsoOptions] = None,
               history: Sequence[Message] = (), **overrides) -> Iterator[StepEvent]:
        return stream(self.engine, image, query, self._opts(options, overrides), heads=self.heads,
                      history=history)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "Ecso":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
