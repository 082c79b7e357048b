"""What an ECSO request takes and gives: options, per-step traces, the Result, stream events, heads.

Shared by the four steps (runtime/steps.py), both backends (runtime/local_backend.py, runtime/remote.py), the
judges (runtime/judges.py) and the API (runtime/api.py); imports nothing of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum, IntEnum
from typing import Optional, Protocol

from ecso.runtime.errors import InputError
from ecso.runtime.images import LoadedImage
from ecso.runtime.prompts import DECISION_RULES, JUDGE_NAMES, PROMPT_VERSION


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
    # a system prompt put before every step's prompt (steps 1-4); None: the chat format's own default
    system_prompt: Optional[str] = None

    def validate(self) -> None:
        if self.judge not in JUDGE_NAMES:
            raise InputError(f"unknown judge {self.judge!r}; use one of {', '.join(JUDGE_NAMES)}")
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


class StepSeed(IntEnum):
    """Each step samples with `options.seed + its StepSeed`, so the steps' random streams never coincide."""

    ANSWER = 0
    JUDGE = 1
    CAPTION = 2
    REGENERATE = 3


@dataclass(frozen=True)
class GenerationSettings:
    """How one step generates: its token budget and sampling (greedy when temperature is 0)."""

    max_tokens: int
    temperature: float
    top_p: float
    seed: int

    @classmethod
    def for_step(cls, options: EcsoOptions, max_tokens: int, step: StepSeed) -> "GenerationSettings":
        return cls(max_tokens=max_tokens, temperature=options.temperature, top_p=options.top_p,
                   seed=options.seed + int(step))


class JudgeQuestion(Enum):
    """Where a judge asks its question: the paper's fresh TELL prompt with the image, or appended to the
    conversation right after step 1's answer."""

    TELL = "tell"
    APPENDED = "appended"


@dataclass(frozen=True)
class StepOutput:
    """What a backend's generation step produced. `tokens` are the backend's own token ids where it has them
    (the in-process engine; a remote server returns text only)."""

    text: str
    finish_reason: str
    tokens: tuple[int, ...] = ()


@dataclass(frozen=True)
class Verdict:
    """A judge's decision on step 1's answer: unsafe or not, the reply it gave, and P(yes) for logit judges."""

    unsafe: bool
    reply: str
    score: Optional[float] = None


@dataclass
class StepTrace:
    """One step as it ran: how much of its prompt came from the KV cache, what it produced, how long it took."""

    name: str  # answer | judge | guard | caption | regenerate
    prompt_positions: int = 0
    reused_positions: int = 0  # in-process: KV positions kept; remote: the server's reported cached prompt tokens
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
