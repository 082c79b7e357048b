"""The four steps' backend in process: llama.cpp through the engine primitives, with bit-exact KV reuse.

The target is the Engine (sequence 0) or a batched sequence that offers the same primitives (runtime/batch.py).
With reuse on, steps 1-3 share the KV prefix `system + image` and step 4 shares `system`; the image is encoded at
most once per request and not at all when the embedding cache already holds it.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ecso.runtime.engine import Generation, PrefillStats, Prompt, Sampler, Sampling
from ecso.runtime.errors import InputError
from ecso.runtime.images import LoadedImage
from ecso.runtime.kv import TextPiece, aligned_to
from ecso.runtime.prompts import (APPEND_JUDGE_PROMPT, LOGIT_NO, LOGIT_YES, TELL_RESPONSE_CHARS, Message,
                                  cap_prompt, gen_prompt, tell_prompt)
from ecso.runtime.results import EcsoOptions, GenerationSettings, JudgeQuestion, StepOutput, StepTrace
from ecso.runtime.steps import GuardedAnswer, TextSink

# the engine primitives the steps use (Engine, or a batched sequence that behaves like one)
EngineTarget = Any
NO_GUARD_ON_RECURRENT = ("guarded streaming branches a judge off the running answer and cuts it back, which this "
                         "model's recurrent state cannot do (recurrent / hybrid LLMs such as LFM2); run without "
                         "guard_every (--guard-every)")


class StepPrompts:
    """The prompt of every ECSO step of one request, tokenized as the reference does (`Engine.build_prompt`).

    Every text inserted into a prompt (the query, history turns, the model's answer, the caption) is neutralised
    first, so no user or model text can ever become a control token such as `</s>` or `<|im_end|>`.
    `system_prompt` (None: the chat format's default) goes first in every step's prompt."""

    def __init__(self, engine: EngineTarget, image: Optional[LoadedImage], query: str,
                 history: Sequence[Message] = (), system_prompt: Optional[str] = None):
        self.engine, self.image = engine, image
        self.query = engine.clean_user_text(query)
        self.history = [Message(m.role, engine.clean_user_text(m.content)) for m in history]
        self.system = [Message("system", engine.clean_user_text(system_prompt))] if system_prompt is not None else []

    def _user(self, text: str) -> list[Message]:
        return self.system + [Message("user", text)]

    def _conversation(self) -> list[Message]:
        return self.system + self.history + [Message("user", self.query)]

    def answer(self) -> Prompt:
        """Step 1: the conversation and the query, with the image."""
        return self.engine.build_prompt(self._conversation(), self.image)[0]

    def judge(self, answer: str) -> Prompt:
        """Step 2 (paper / logit judge): TELL with the query and the answer, with the image."""
        answer = self.engine.clean_user_text(answer[:TELL_RESPONSE_CHARS])
        return self.engine.build_prompt(self._user(tell_prompt(self.query, answer)), self.image)[0]

    def caption(self) -> Prompt:
        """Step 3: CAP, the query-aware caption request, with the image."""
        return self.engine.build_prompt(self._user(cap_prompt(self.query)), self.image)[0]

    def regenerate(self, caption: str) -> Prompt:
        """Step 4: GEN from the caption and the query, without the image."""
        text = gen_prompt(self.engine.clean_user_text(caption), self.query)
        return self.engine.build_prompt(self._user(text), None)[0]

    def appended(self, answer_prompt: Prompt, answer_tokens: Sequence[int], answer: str, question: str) -> Prompt:
        """Step 2 (append judges): the whole conversation, step 1's answer included, plus `question` as a new user
        turn, tokenized as the reference tokenizes it. Batched as the cache holds step 1 (its prompt, then one
        decode per generated token), so everything that matches the generated tokens is reused."""
        msgs = self._conversation() + [Message("assistant", self.engine.clean_user_text(answer))]
        prompt = self.engine.build_prompt(msgs + [Message("user", question)], self.image)[0]
        base = answer_prompt.pieces + [TextPiece((t,)) for t in answer_tokens]
        return Prompt(aligned_to(prompt.pieces, base), prompt.images)

    def continuation(self, question: str) -> list[int]:
        """Tokens that close the assistant turn right after the generated tokens and ask `question` in a new user
        turn (the guard's branch). Raises ChatTemplateError if the template does not echo the answer verbatim."""
        msgs = self._conversation() + [Message("assistant", ""), Message("user", question)]
        text = self.engine.chat_format.after_assistant(msgs, self.image is not None)
        return self.engine.tokenize(text, add_special=False)


def yes_no_ids(engine: EngineTarget) -> tuple[list[int], list[int]]:
    """Single-token spellings of yes / no in this vocabulary (for the logit judge)."""
    return engine.single_token_ids(LOGIT_YES), engine.single_token_ids(LOGIT_NO)


def p_yes(logits: np.ndarray, yes: list[int], no: list[int]) -> float:
    """P(yes) / (P(yes) + P(no)) from next-token logits."""
    z = logits.astype(np.float64)
    z = np.exp(z - z.max())
    py, pn = z[yes].sum(), z[no].sum()
    return float(py / (py + pn)) if py + pn > 0 else 0.0


class LocalBackend:
    """The steps' backend on the engine primitives of `target` (see the module docstring)."""

    def __init__(self, target: EngineTarget, image: Optional[LoadedImage], query: str, history: Sequence[Message],
                 options: EcsoOptions):
        if options.guard_every > 0 and options.defense and not target.kv_rollback:
            raise InputError(NO_GUARD_ON_RECURRENT)
        self.target, self.options = target, options
        self.image = image
        self.image_cache_hit = image is not None and target.has_encoded(image)
        self.prompts = StepPrompts(target, image, query, history, options.system_prompt)
        self.query = self.prompts.query
        self.answer_prompt: Optional[Prompt] = None  # step 1's prompt, which the appended judges extend

    # --- the steps -----------------------------------------------------------------------------------------
    def answer(self, trace: StepTrace, settings: GenerationSettings, on_text: TextSink) -> StepOutput:
        self.answer_prompt = self.prompts.answer()
        self.prefill(trace, self.answer_prompt, settings.max_tokens)
        return self.generate(trace, settings, on_text=on_text)

    def judge_reply(self, trace: StepTrace, question: JudgeQuestion, answer: StepOutput,
                    settings: GenerationSettings, stop_when: Optional[Callable[[str], bool]]) -> StepOutput:
        self.prefill(trace, self.judge_prompt(question, answer), settings.max_tokens)
        should_stop = None
        if stop_when is not None:
            def should_stop(tokens: list[int]) -> bool:
                return stop_when(self.target.detokenize(tokens))
        return self.generate(trace, settings, should_stop=should_stop)

    def judge_p_yes(self, trace: StepTrace, question: JudgeQuestion, answer: StepOutput) -> float:
        self.prefill(trace, self.judge_prompt(question, answer), 1)
        return p_yes(self.target.logits(), *self.yes_no())

    def caption(self, trace: StepTrace, settings: GenerationSettings) -> StepOutput:
        self.prefill(trace, self.prompts.caption(), settings.max_tokens)
        return self.generate(trace, settings)

    def regenerate(self, trace: StepTrace, caption: str, settings: GenerationSettings,
                   on_text: TextSink) -> StepOutput:
        self.prefill(trace, self.prompts.regenerate(caption), settings.max_tokens)
        return self.generate(trace, settings, on_text=on_text)

    def guarded_answer(self, trace: StepTrace, settings: GenerationSettings, guard_every: int,
                       guard_threshold: float, on_text: TextSink) -> GuardedAnswer:
        """Generates the answer in segments of guard_every tokens; after each, branches a logit judge off the
        running answer (append-style), then rolls the judge back. Stops and retracts when it says unsafe."""
        target = self.target
        self.answer_prompt = self.prompts.answer()
        self.prefill(trace, self.answer_prompt, settings.max_tokens)
        yes, no = self.yes_no()
        branch = self.prompts.continuation(APPEND_JUDGE_PROMPT)
        tokens: list[int] = []
        first_token: Optional[int] = None
        score: Optional[float] = None
        guard = StepTrace("guard")
        seconds = 0.0
        finish = "length"
        # one sampler for the whole answer: pausing for the guard must not restart its random sequence
        with target.sampler(self.sampling(settings)) as sampler:
            while len(tokens) < settings.max_tokens:
                segment = min(guard_every, settings.max_tokens - len(tokens))
                g = self.run_generation(trace, self.sampling(settings, segment), on_text=on_text,
                                        first_token=first_token, sampler=sampler)
                tokens += g.tokens
                seconds += g.seconds
                finish = g.finish_reason
                if g.finish_reason != "length" or len(tokens) >= settings.max_tokens:
                    break
                t0 = time.perf_counter()
                first_token = target.sample_next(sampler)
                mark = target.n_past
                if mark + len(branch) + 1 > target.n_ctx:
                    guard.prefill_seconds += time.perf_counter() - t0
                    continue  # no room to branch a judge: keep generating unguarded
                target.append_tokens(branch)
                score = p_yes(target.logits(), yes, no)
                target.rollback(mark)
                guard.prefill_seconds += time.perf_counter() - t0
                guard.evaluated_positions += len(branch)
                guard.generated_tokens += 1
                if score >= guard_threshold:
                    guard.text = f"unsafe at token {len(tokens)} (P(yes)={score:.3f})"
                    output = StepOutput(text=target.detokenize(tokens), finish_reason="aborted", tokens=tuple(tokens))
                    return GuardedAnswer(output=output, retracted=True, score=score, guard_trace=guard)
        guard.text = "never fired"
        output = StepOutput(text=target.detokenize(tokens), finish_reason=finish, tokens=tuple(tokens))
        return GuardedAnswer(output=output, retracted=False, score=score, guard_trace=guard)

    def describe(self) -> dict:
        return self.target.describe()

    # --- on the engine primitives --------------------------------------------------------------------------
    def judge_prompt(self, question: JudgeQuestion, answer: StepOutput) -> Prompt:
        if question is JudgeQuestion.TELL:
            return self.prompts.judge(answer.text.strip())
        assert self.answer_prompt is not None, "the appended judge runs after step 1"
        return self.prompts.appended(self.answer_prompt, answer.tokens, answer.text.strip(), APPEND_JUDGE_PROMPT)

    def yes_no(self) -> tuple[list[int], list[int]]:
        ids = yes_no_ids(self.target)
        if not ids[0] or not ids[1]:
            raise InputError("this vocabulary has no single-token yes/no; use --judge paper or append")
        return ids

    @staticmethod
    def sampling(settings: GenerationSettings, max_tokens: Optional[int] = None) -> Sampling:
        return Sampling(settings.temperature, settings.top_p, settings.seed,
                        settings.max_tokens if max_tokens is None else max_tokens)

    def prefill(self, trace: StepTrace, prompt: Prompt, max_tokens: int) -> PrefillStats:
        self.target.check_budget(prompt, max_tokens, f"step '{trace.name}'")
        stats = self.target.prefill(prompt, reuse=self.options.reuse)
        trace.prompt_positions += stats.n_prompt
        trace.reused_positions += stats.n_reused
        trace.evaluated_positions += stats.n_evaluated
        trace.image_encodes += stats.image_encodes
        trace.prefill_seconds += stats.seconds
        return stats

    def generate(self, trace: StepTrace, settings: GenerationSettings, on_text: Optional[TextSink] = None,
                 should_stop: Optional[Callable[[list[int]], bool]] = None) -> StepOutput:
        g = self.run_generation(trace, self.sampling(settings), on_text=on_text, should_stop=should_stop)
        return StepOutput(text=g.text, finish_reason=g.finish_reason, tokens=tuple(g.tokens))

    def run_generation(self, trace: StepTrace, sampling: Sampling, on_text: Optional[TextSink] = None,
                       first_token: Optional[int] = None, should_stop: Optional[Callable[[list[int]], bool]] = None,
                       sampler: Optional[Sampler] = None) -> Generation:
        g = self.target.generate(sampling, on_text=on_text, first_token=first_token, should_stop=should_stop,
                                 sampler=sampler)
        trace.generated_tokens += len(g.tokens)
        trace.generate_seconds += g.seconds
        trace.finish_reason = g.finish_reason
        return g
