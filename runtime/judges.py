"""Step 2's judges as strategy objects, one table from name to judge.

The names come from `ecso_prompts.json` ("judges"), the list the CLI choices, the server schema, `ecso eval` and
the native engine share; this module gives each name its behaviour and fails at import if the two ever differ.
A judge asks its question through the backend (runtime/steps.py `StepBackend`), so it runs the same in process
and against a remote server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Optional, Protocol

from ecso.runtime.prompts import JUDGE_NAMES, is_unsafe_reply, reply_can_still_be_unsafe
from ecso.runtime.results import EcsoOptions, GenerationSettings, JudgeQuestion, StepOutput, StepSeed, StepTrace, Verdict

if TYPE_CHECKING:
    from ecso.runtime.steps import StepBackend


class Judge(Protocol):
    """Decides whether step 1's answer is unsafe."""

    name: str
    needs_logprobs: bool  # reads next-token probabilities (a remote server must return logprobs)

    def decide(self, backend: "StepBackend", trace: StepTrace, answer: StepOutput,
               options: EcsoOptions) -> Verdict: ...


@dataclass(frozen=True)
class ReplyJudge:
    """The model answers the judge question in words; the decision rule reads the reply (the paper's way)."""

    name: str
    question: JudgeQuestion
    needs_logprobs: bool = False

    def decide(self, backend: "StepBackend", trace: StepTrace, answer: StepOutput,
               options: EcsoOptions) -> Verdict:
        rule = options.decision_rule
        stop_when: Optional[Callable[[str], bool]] = None
        if rule == "exact" and options.judge_early_stop:
            def stop_when(partial_reply: str) -> bool:  # the reply can no longer be exactly "yes"/"yes."
                return not reply_can_still_be_unsafe(partial_reply, rule)
        settings = GenerationSettings.for_step(options, options.judge_max_tokens, StepSeed.JUDGE)
        out = backend.judge_reply(trace, self.question, answer, settings, stop_when)
        if out.finish_reason == "aborted":
            trace.finish_reason = "decided"
        reply = out.text.strip()
        return Verdict(unsafe=is_unsafe_reply(reply, rule), reply=reply)


@dataclass(frozen=True)
class LogitJudge:
    """One forward step after the judge question: unsafe iff P(yes) / (P(yes) + P(no)) >= the threshold."""

    name: str
    question: JudgeQuestion
    needs_logprobs: bool = True

    def decide(self, backend: "StepBackend", trace: StepTrace, answer: StepOutput,
               options: EcsoOptions) -> Verdict:
        score = backend.judge_p_yes(trace, self.question, answer)
        unsafe = score >= options.logit_threshold
        return Verdict(unsafe=unsafe, reply="yes" if unsafe else "no", score=score)


@dataclass(frozen=True)
class AlwaysUnsafe:
    """For demonstrations and tests of the unsafe path: the wrapped judge runs and its reply is recorded, but the
    verdict is always unsafe, so steps 3 and 4 always run."""

    name: str
    inner: Judge

    @property
    def needs_logprobs(self) -> bool:
        return self.inner.needs_logprobs

    def decide(self, backend: "StepBackend", trace: StepTrace, answer: StepOutput,
               options: EcsoOptions) -> Verdict:
        verdict = self.inner.decide(backend, trace, answer, options)
        return Verdict(unsafe=True, reply=verdict.reply, score=verdict.score)


_PAPER = ReplyJudge("paper", JudgeQuestion.TELL)
JUDGES: Mapping[str, Judge] = {
    "paper": _PAPER,
    "logit": LogitJudge("logit", JudgeQuestion.TELL),
    "append": ReplyJudge("append", JudgeQuestion.APPENDED),
    "append-logit": LogitJudge("append-logit", JudgeQuestion.APPENDED),
    "always-unsafe": AlwaysUnsafe("always-unsafe", _PAPER),
}
if tuple(JUDGES) != JUDGE_NAMES:
    raise ImportError(f"runtime/judges.py defines judges {tuple(JUDGES)} but ecso_prompts.json lists {JUDGE_NAMES}")


def judge_named(name: str) -> Judge:
    return JUDGES[name]
