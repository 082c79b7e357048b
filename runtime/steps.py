"""ECSO's four steps, top to bottom, against one narrow backend interface.

1. answer the query with the image;  2. the same model judges its answer (TELL);
3. if unsafe: a query-aware caption of the image (CAP);  4. answer again from query + caption, without the image (GEN).

The steps are written once. A backend renders each step's prompt and generates: the in-process engine
(runtime/local_backend.py, with bit-exact KV reuse of `system + image` across steps 1-3) or an OpenAI-compatible
server (runtime/remote.py, where reuse is the server's prefix cache). Options beyond the paper (logit judge,
appended judge, loose "contains yes" rule, guarded streaming) are off by default and recorded in the Result.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Protocol

from ecso.runtime.images import LoadedImage
from ecso.runtime.judges import JUDGES
from ecso.runtime.results import (EcsoOptions, GenerationSettings, Heads, JudgeQuestion, Result, StepEvent,
                                  StepOutput, StepSeed, StepTrace, Verdict)

TextSink = Callable[[str], None]


@dataclass(frozen=True)
class GuardedAnswer:
    """Step 1 generated under guarded streaming: the answer, whether the guard retracted it, its last P(yes), and
    the guard's own trace."""

    output: StepOutput
    retracted: bool
    score: Optional[float]
    guard_trace: StepTrace


class StepBackend(Protocol):
    """What the four steps need from a model. Each method renders its step's prompt (with the request's image,
    query, history and system prompt, all fixed when the backend was made), runs it, and adds what it cost to
    `trace`. `on_text` receives generated text as it arrives."""

    image: Optional[LoadedImage]  # the request's image, already loaded and checked (heads read it)
    query: str  # the query as it goes into prompts (control tokens neutralised)
    image_cache_hit: bool  # the image's encoding was already cached before this request

    def answer(self, trace: StepTrace, settings: GenerationSettings, on_text: TextSink) -> StepOutput:
        """Step 1: the conversation and the query, with the image."""

    def guarded_answer(self, trace: StepTrace, settings: GenerationSettings, guard_every: int,
                       guard_threshold: float, on_text: TextSink) -> GuardedAnswer:
        """Step 1 with a logit judge branched off the partial answer every `guard_every` tokens."""

    def judge_reply(self, trace: StepTrace, question: JudgeQuestion, answer: StepOutput,
                    settings: GenerationSettings, stop_when: Optional[Callable[[str], bool]]) -> StepOutput:
        """Step 2: the judge question about `answer`, replied in words; `stop_when(partial_reply)` may end the
        reply early (finish_reason "aborted") once the verdict cannot change."""

    def judge_p_yes(self, trace: StepTrace, question: JudgeQuestion, answer: StepOutput) -> float:
        """Step 2: P(yes) / (P(yes) + P(no)) of the judge reply's first token."""

    def caption(self, trace: StepTrace, settings: GenerationSettings) -> StepOutput:
        """Step 3: CAP, the query-aware caption, with the image."""

    def regenerate(self, trace: StepTrace, caption: str, settings: GenerationSettings,
                   on_text: TextSink) -> StepOutput:
        """Step 4: GEN from the caption and the query, without the image."""

    def describe(self) -> dict:
        """Facts about the model and backend, recorded in the Result."""


class EcsoRequest:
    """One request, ready to run: `run()` goes through the steps and returns the Result."""

    def __init__(self, backend: StepBackend, options: EcsoOptions, emit: Callable[[StepEvent], None],
                 heads: Heads, started_at: float):
        self.backend, self.options, self.emit, self.heads = backend, options, emit, heads
        self.started_at = started_at
        self.steps: list[StepTrace] = []

    def run(self) -> Result:
        options, backend = self.options, self.backend
        # step 1: the answer, with the image
        trace = self.start_step("answer")
        retracted, guard_score = False, None
        if options.guard_every > 0 and options.defense:
            guarded = backend.guarded_answer(trace, self.settings(options.max_tokens, StepSeed.ANSWER),
                                             options.guard_every, options.guard_threshold, self.token_sink(trace))
            self.steps.append(guarded.guard_trace)
            first, retracted, guard_score = guarded.output, guarded.retracted, guarded.score
        else:
            first = backend.answer(trace, self.settings(options.max_tokens, StepSeed.ANSWER), self.token_sink(trace))
        initial_answer = first.text.strip()
        self.end_step(trace, initial_answer)
        if not options.defense:
            return self.finish(answer=initial_answer, initial_answer=initial_answer, verdict=None, caption=None)

        # step 2: the judge (or the guard, which already judged the partial answer)
        if retracted:
            self.emit(StepEvent("retract", "answer", initial_answer))
            verdict = Verdict(unsafe=True, reply="yes", score=guard_score)
        else:
            verdict = self.judge(first, initial_answer)
        if not verdict.unsafe:
            return self.finish(answer=initial_answer, initial_answer=initial_answer, verdict=verdict, caption=None)

        # step 3: query-aware caption, with the image (none without an image)
        caption = ""
        if backend.image is not None:
            trace = self.start_step("caption")
            if self.heads.caption is not None:
                out = self.heads.caption.caption(backend.image, backend.query)
                trace.path = f"head:{self.heads.caption.name}@{out.provider}"
                trace.generate_seconds = out.seconds
                caption = out.text.strip()
            else:
                settings = self.settings(options.caption_max_tokens, StepSeed.CAPTION)
                caption = backend.caption(trace, settings).text.strip()
            self.end_step(trace, caption)

        # step 4: eyes closed - the answer again from query + caption, no image
        trace = self.start_step("regenerate")
        settings = self.settings(options.max_tokens, StepSeed.REGENERATE)
        final = backend.regenerate(trace, caption, settings, self.token_sink(trace)).text.strip()
        self.end_step(trace, final)
        return self.finish(answer=final, initial_answer=initial_answer, verdict=verdict, caption=caption,
                           retracted=retracted)

    def judge(self, first: StepOutput, initial_answer: str) -> Verdict:
        trace = self.start_step("judge")
        head = self.heads.judge
        if head is not None:
            head_verdict = head.judge(self.backend.query, initial_answer)
            trace.path = f"head:{head.name}@{head_verdict.provider}"
            trace.generate_seconds = head_verdict.seconds
            verdict = Verdict(unsafe=bool(head_verdict.unsafe), reply="yes" if head_verdict.unsafe else "no",
                              score=float(head_verdict.score))
        else:
            verdict = JUDGES[self.options.judge].decide(self.backend, trace, first, self.options)
        self.end_step(trace, verdict.reply)
        return verdict

    # --- bookkeeping ---------------------------------------------------------------------------------------
    def settings(self, max_tokens: int, step: StepSeed) -> GenerationSettings:
        return GenerationSettings.for_step(self.options, max_tokens, step)

    def token_sink(self, trace: StepTrace) -> TextSink:
        def on_text(delta: str) -> None:
            self.emit(StepEvent("token", trace.name, delta))
        return on_text

    def start_step(self, name: str) -> StepTrace:
        trace = StepTrace(name)
        self.steps.append(trace)
        self.emit(StepEvent("step_start", name))
        return trace

    def end_step(self, trace: StepTrace, text: str) -> None:
        trace.text = text
        self.emit(StepEvent("step_end", trace.name, text, trace=trace))

    def judge_label(self, retracted: bool) -> str:
        if not self.options.defense:
            return "none"
        if retracted:
            return "guard"
        return f"head:{self.heads.judge.name}" if self.heads.judge is not None else self.options.judge

    def finish(self, answer: str, initial_answer: str, verdict: Optional[Verdict], caption: Optional[str],
               retracted: bool = False) -> Result:
        result = Result(answer=answer, unsafe=verdict is not None and verdict.unsafe, initial_answer=initial_answer,
                        judge=self.judge_label(retracted), judge_reply=verdict.reply if verdict else "",
                        judge_score=verdict.score if verdict else None, caption=caption, retracted=retracted,
                        steps=self.steps, image_encodes=sum(s.image_encodes for s in self.steps),
                        image_cache_hit=self.backend.image_cache_hit, seconds=time.perf_counter() - self.started_at,
                        decision_rule=self.options.decision_rule, options=asdict(self.options),
                        engine=self.backend.describe())
        self.emit(StepEvent("result", "", answer, result=result))
        return result
