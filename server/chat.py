"""One chat completion request reduced to one ECSO request, and ECSO results turned into OpenAI replies.

Anything that would silently change the meaning of the answer (n > 1, tools, stop sequences, JSON mode, log-probs)
is refused with a 400 that says so, so a client never gets an answer to a question it did not ask.

Conversations: earlier turns go to the model as history before the last user message (step 1 and the appended
judges; the paper's TELL / CAP / GEN stay single-turn). The conversation's most recent image goes first in the first
user turn (LLaVA style). A system/developer message counts only as the first message; others, and empty messages,
are left out and counted in `ecso.turns_dropped`. Follow-up turns on the same image stay cheap: the image embedding
and the `system + image` KV prefix are reused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Optional

from pydantic import ValidationError

from ecso.runtime import EcsoOptions, ImageLimits, LoadedImage, Message, Result, load_image
from ecso.runtime.errors import ContextOverflowError, EcsoError, ImageError, InputError
from ecso.server.media import MediaPolicy, fetch_image
from ecso.server.schemas import (ApiError, AssistantMessage, ChatCompletion, ChatCompletionChunk,
                                 ChatCompletionRequest, ChatMessage, Choice, ChunkChoice, Delta, EcsoSummary,
                                 SlotInfo, StepTiming, Timings, Usage, validation_error)


@dataclass(frozen=True)
class ChatRequest:
    """What ECSO runs for one chat completion."""

    query: str
    image: Optional[LoadedImage]
    options: EcsoOptions
    stream: bool
    include_usage: bool
    ecso_events: bool  # stream ECSO's steps as named `ecso` SSE events (asked for by the page)
    turns_dropped: int  # earlier messages not sent to the model (a late system message, an empty message)
    history: tuple[Message, ...] = ()


def parse_chat_request(raw: bytes, defaults: EcsoOptions, policy: MediaPolicy, limits: ImageLimits,
                       max_query_chars: int) -> ChatRequest:
    """Validates a JSON body; the image is fetched and decoded here, before the request queues for the engine."""
    try:
        body = ChatCompletionRequest.model_validate_json(raw)
    except ValidationError as e:
        raise validation_error(e) from None
    _refuse_unsupported(body)
    history, dropped, query, images = _conversation(body.messages)
    if len(query) > max_query_chars:
        raise ApiError(400, f"the query has {len(query)} characters, over the limit of {max_query_chars}",
                       "context_length_exceeded", "messages")
    image = None
    if images:
        data = fetch_image(images[-1], policy)
        try:
            image = load_image(data, limits)
        except ImageError as e:
            raise ApiError(400, str(e).replace("<bytes>", "the image"), "invalid_image", "messages") from None
    so = body.stream_options
    return ChatRequest(query, image, _options(body, defaults), body.stream, bool(so and so.include_usage),
                       bool(so and so.ecso_events), dropped, tuple(history))


def _refuse_unsupported(body: ChatCompletionRequest) -> None:
    if body.n not in (1, None):
        raise ApiError(400, "only n=1 is supported (one model, one answer per request)", param="n")
    if body.stop:
        raise ApiError(400, "stop sequences are not supported by this server; remove `stop`", param="stop")
    if body.tools or body.functions:
        raise ApiError(400, "tools / function calling are not supported by this server", param="tools")
    if body.logprobs:
        raise ApiError(400, "logprobs are not supported by this server", param="logprobs")
    fmt = body.response_format
    if fmt not in (None, {}) and fmt.get("type") != "text":
        raise ApiError(400, "only response_format {\"type\": \"text\"} is supported", param="response_format")


def _conversation(messages: list[ChatMessage]) -> tuple[list[Message], int, str, list[str]]:
    """(history, dropped turns, query, image URLs) of a validated message list."""
    history: list[Message] = []
    dropped = 0
    images: list[str] = []
    for i, m in enumerate(messages):
        texts, found = _content(m, i)
        images += found
        if i == len(messages) - 1:
            if m.role != "user":
                raise ApiError(400, "the last message must be from the user", param="messages")
            if len(found) > 1:
                raise ApiError(400, f"one image per request: the last user message has {len(found)} images",
                               param="messages")
            query = "\n".join(texts)
            if not query.strip():
                raise ApiError(400, "the query is empty: the last user message has no text", param="messages")
            return history, dropped, query, images
        role, text = ("system" if m.role == "developer" else m.role), "\n".join(texts)
        if not text.strip() or (role == "system" and history):
            dropped += 1
        else:
            history.append(Message(role, text))
    raise AssertionError("unreachable: messages has at least one item")


def _content(m: ChatMessage, i: int) -> tuple[list[str], list[str]]:
    """Texts and image URLs of one message."""
    if m.content is None:
        if m.role == "assistant":
            return [], []
        raise ApiError(400, f"messages[{i}].content is required", param=f"messages[{i}].content")
    if isinstance(m.content, str):
        return [m.content], []
    texts = [p.text for p in m.content if p.type == "text"]
    images = [p.url for p in m.content if p.type == "image_url"]
    if images and m.role != "user":
        raise ApiError(400, "images are only accepted in user messages", param=f"messages[{i}].content")
    return texts, images


def _options(body: ChatCompletionRequest, defaults: EcsoOptions) -> EcsoOptions:
    over: dict = {}
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is not None:
        over["max_tokens"] = over["caption_max_tokens"] = max_tokens
    for key in ("temperature", "top_p", "seed"):
        if getattr(body, key) is not None:
            over[key] = getattr(body, key)
    if over.get("top_p") == 0.0:
        over["top_p"] = 1e-6  # OpenAI allows 0: the most likely token only
    if body.ecso is not None:
        over.update(body.ecso.model_dump(exclude_none=True))
    options = replace(defaults, **over)
    try:
        options.validate()
    except InputError as e:
        raise ApiError(400, str(e), "invalid_request", "ecso") from None
    return options


def api_error_from(e: BaseException) -> ApiError:
    """Runtime errors as statuses: the user's fault -> 400, the engine's -> 500 (the server keeps serving)."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ContextOverflowError):
        return ApiError(400, str(e), "context_length_exceeded", "messages")
    if isinstance(e, ImageError):
        return ApiError(400, str(e), "invalid_image", "messages")
    if isinstance(e, InputError):
        return ApiError(400, str(e), "invalid_request")
    if isinstance(e, EcsoError):
        return ApiError(500, str(e), "engine_error")
    return ApiError(500, f"internal error ({type(e).__name__}); the server is still running", "internal_error")


# ----------------------------------------------------------------------------------------------------- replies
def finish_reason(result: Result) -> str:
    """`length` when the shown answer hit max_tokens, else `stop`."""
    shown = [s for s in result.steps if s.name in ("answer", "regenerate")]
    return "length" if shown and shown[-1].finish_reason == "length" else "stop"


def usage(result: Result) -> Usage:
    """Tokens the whole ECSO request cost: every step's prompt and generated tokens."""
    prompt = sum(s.prompt_positions for s in result.steps)
    completion = sum(s.generated_tokens for s in result.steps)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def step_timing(s) -> StepTiming:
    return StepTiming(name=s.name, path=s.path, seconds=round(s.seconds, 4),
                      prefill_seconds=round(s.prefill_seconds, 4), generate_seconds=round(s.generate_seconds, 4),
                      prompt_positions=s.prompt_positions, reused_positions=s.reused_positions,
                      evaluated_positions=s.evaluated_positions, generated_tokens=s.generated_tokens,
                      image_encodes=s.image_encodes)


def ecso_summary(result: Result, queue_seconds: float, turns_dropped: int, slot: SlotInfo) -> EcsoSummary:
    return EcsoSummary(
        unsafe=result.unsafe, judge=result.judge, judge_reply=result.judge_reply, judge_score=result.judge_score,
        caption=result.caption, retracted=result.retracted, image_encodes=result.image_encodes,
        image_cache_hit=result.image_cache_hit, prompt_version=result.prompt_version,
        decision_rule=result.decision_rule, turns_dropped=turns_dropped, slot=slot,
        timings=Timings(queue_seconds=round(queue_seconds, 4), total_seconds=round(result.seconds, 4),
                        steps=[step_timing(s) for s in result.steps]))


@dataclass(frozen=True)
class ReplyIds:
    """What every reply of one request carries."""

    id: str
    model: str
    fingerprint: str

    def completion(self, result: Result, ecso: EcsoSummary) -> ChatCompletion:
        return ChatCompletion(id=self.id, created=int(time.time()), model=self.model,
                              system_fingerprint=self.fingerprint,
                              choices=[Choice(message=AssistantMessage(content=result.answer),
                                              finish_reason=finish_reason(result))],
                              usage=usage(result), ecso=ecso)

    def chunk(self, delta: Optional[Delta], finish: Optional[str] = None, usage: Optional[Usage] = None,
              ecso: Optional[EcsoSummary] = None) -> ChatCompletionChunk:
        choices = [] if delta is None else [ChunkChoice(delta=delta, finish_reason=finish)]
        return ChatCompletionChunk(id=self.id, created=int(time.time()), model=self.model,
                                   system_fingerprint=self.fingerprint, choices=choices, usage=usage, ecso=ecso)
