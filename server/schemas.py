"""OpenAI chat-completions shapes as pydantic models, and the OpenAI-style error every refusal becomes.

Requests: only what an ECSO request can honour is accepted (see `chat.py` for the refusals of n > 1, tools, stop
sequences, ...). Unknown top-level fields are ignored, as OpenAI-compatible servers do; unknown ECSO options are not.
Validation errors become one-line 400s naming the field (`messages[0].content[1].image_url.url: ...`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ecso.runtime.prompts import JUDGE_NAMES

PositiveInt = Annotated[int, Field(strict=True, ge=1)]
Number = Annotated[float, Field(strict=True)]
JUDGES = Literal[JUDGE_NAMES]  # the runtime's judge table (runtime/judges.py): one place for the names


class ApiError(Exception):
    """An error reply: HTTP status + OpenAI-style body `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, code: Optional[str] = None, param: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    @property
    def type(self) -> str:
        if self.status == 401:
            return "authentication_error"
        if self.status == 429:
            return "rate_limit_error"
        if self.status == 503:
            return "server_busy"
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict:
        return ErrorBody(error=ErrorDetail(message=self.message, type=self.type, param=self.param,
                                           code=self.code)).model_dump()


# ------------------------------------------------------------------------------------------------------ requests
class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImageURL(_Lenient):
    url: Annotated[str, Field(min_length=1)]
    detail: Optional[str] = None


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: Union[ImageURL, Annotated[str, Field(min_length=1)]]

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None


class StreamOptions(_Lenient):
    include_usage: bool = False
    ecso_events: bool = False  # ecso's addition: named `ecso` SSE events with each step as it runs (the page)


class EcsoOverrides(BaseModel):
    """EcsoOptions a client may set per request (`"ecso": {...}`; openai: `extra_body={"ecso": {...}}`)."""

    model_config = ConfigDict(extra="forbid")
    defense: Optional[bool] = None
    judge: Optional[JUDGES] = None
    decision_rule: Optional[Literal["exact", "contains"]] = None
    logit_threshold: Optional[Number] = None
    judge_max_tokens: Optional[PositiveInt] = None
    caption_max_tokens: Optional[PositiveInt] = None
    reuse: Optional[bool] = None
    guard_every: Optional[Annotated[int, Field(strict=True, ge=0)]] = None
    guard_threshold: Optional[Number] = None


class ChatCompletionRequest(_Lenient):
    model: Optional[str] = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Optional[PositiveInt] = None
    max_completion_tokens: Optional[PositiveInt] = None
    temperature: Optional[Annotated[float, Field(strict=True, ge=0.0, le=2.0)]] = None
    top_p: Optional[Annotated[float, Field(strict=True, ge=0.0, le=1.0)]] = None
    seed: Optional[Annotated[int, Field(strict=True)]] = None
    stream: Annotated[bool, Field(strict=True)] = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = 1
    stop: Union[str, list[str], None] = None
    tools: Optional[list[Any]] = None
    functions: Optional[list[Any]] = None
    logprobs: Optional[bool] = None
    response_format: Optional[dict[str, Any]] = None
    ecso: Optional[EcsoOverrides] = None


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _field_path(loc: tuple) -> str:
    """pydantic's loc -> `messages[0].content[1].image_url.url` (union member tags such as 'str' dropped)."""
    out = ""
    prev = None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part in _TYPE_TAGS or part[:1].isupper() or part == prev:  # union member tags
            continue
        else:
            out += ("." if out else "") + part
        prev = part
    return out


def validation_error(e: ValidationError) -> ApiError:
    """The most specific pydantic error as a one-line OpenAI-style 400 that names the field."""
    errors = e.errors(include_url=False, include_context=False)
    err = max(errors, key=lambda x: len(x["loc"]))  # in a union, the deepest error is the one that matters
    path = _field_path(tuple(err["loc"]))
    kind, msg = err["type"], err["msg"]
    if kind == "json_invalid":
        if "recursion" in msg:
            return ApiError(400, "the request body is nested too deeply", "invalid_json")
        return ApiError(400, f"the request body is not valid JSON ({msg.removeprefix('Invalid JSON: ')})",
                        "invalid_json")
    if kind == "model_type" and not path:
        return ApiError(400, "the request body must be a JSON object", "invalid_request")
    if kind == "union_tag_invalid":
        tag = err.get("input", {}).get("type") if isinstance(err.get("input"), dict) else None
        return ApiError(400, f"{path}: unsupported content part {tag!r} (use text and image_url)",
                        "invalid_request", path)
    if kind == "extra_forbidden" and path.startswith("ecso."):
        allowed = ", ".join(EcsoOverrides.model_fields)
        return ApiError(400, f"unknown ECSO option {path[5:]!r}; allowed: {allowed}", "invalid_request", "ecso")
    return ApiError(400, f"{path or 'body'}: {msg}", "invalid_request", path or None)


# ------------------------------------------------------------------------------------------------------ replies
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class StepTiming(BaseModel):
    name: str
    path: str
    seconds: float
    prefill_seconds: float
    generate_seconds: float
    prompt_positions: int
    reused_positions: int
    evaluated_positions: int
    generated_tokens: int
    image_encodes: int


class Timings(BaseModel):
    queue_seconds: float
    total_seconds: float
    steps: list[StepTiming]


class SlotInfo(BaseModel):
    """Where a request ran: slot `index` of `slots` (`ecso serve --parallel`), and the most requests that ran at
    once while it did (itself included; above 1 means it shared decode steps with others when slots > 1)."""

    index: int
    slots: int
    max_concurrent: int


class EcsoSummary(BaseModel):
    """The extra `ecso` object on replies: verdict, judge reply, caption, timings. Never the unsafe first answer."""

    unsafe: bool
    judge: str
    judge_reply: str
    judge_score: Optional[float]
    caption: Optional[str]
    retracted: bool
    image_encodes: int
    image_cache_hit: bool
    prompt_version: str
    decision_rule: str
    turns_dropped: int
    slot: SlotInfo
    timings: Timings


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[Choice]
    usage: Usage
    ecso: EcsoSummary


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Optional[str] = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None
    ecso: Optional[EcsoSummary] = None

    def dump(self) -> dict:
        """As OpenAI sends it: `usage` only on the usage chunk, `ecso` only on the final one."""
        d = self.model_dump(exclude={k for k in ("usage", "ecso") if getattr(self, k) is None})
        for c in d["choices"]:
            c["delta"] = {k: v for k, v in c["delta"].items() if v is not None}
        return d


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ecso"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
