"""OpenAI chat-completions shapes for the server: parse a request into one ECSO request, build replies and errors.

Only what an ECSO request can honour is accepted. Anything that would silently change the meaning of the answer
(n > 1, tools, stop sequences, JSON mode, log-probs) is refused with a 400 that says so, so a client never gets an
answer to a question it did not ask. Unknown fields are ignored, as OpenAI-compatible servers do.

Conversations: earlier turns go to the model as history before the last user message (step 1 and the appended
judges; the paper's TELL / CAP / GEN stay single-turn). The conversation's most recent image goes first in the first
user turn (LLaVA style). A system/developer message counts only as the first message; others, and empty messages,
are left out and counted in `ecso.turns_dropped`. Follow-up turns on the same image stay cheap: the image embedding
and the `system + image` KV prefix are reused.
"""

from __future__ import annotations

import base64
import binascii
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional

from ecso.runtime.ecso import EcsoOptions, Result
from ecso.runtime.errors import EcsoError, ImageError, InputError
from ecso.runtime.images import ImageLimits, LoadedImage, load_image
from ecso.runtime.prompts import Message

# EcsoOptions a client may override per request with `"ecso": {...}` (openai: extra_body={"ecso": {...}})
OVERRIDABLE = ("defense", "judge", "decision_rule", "logit_threshold", "judge_max_tokens", "caption_max_tokens",
               "reuse", "guard_every", "guard_threshold")
ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class MediaPolicy:
    """Where images may come from. Default: only `data:` URIs, so a request can never make the server read a local
    file or reach the network. `file://` needs an allowed directory, http(s) an allowed domain."""

    max_image_bytes: int = 20 * 1024 * 1024
    allow_file_dirs: tuple[str, ...] = ()
    allow_domains: tuple[str, ...] = ()  # "example.com" matches that host; ".example.com" its subdomains too
    fetch_timeout: float = 10.0


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
        if self.status in (429, 503):
            return "rate_limit_error" if self.status == 429 else "server_busy"
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def api_error_from(e: BaseException) -> ApiError:
    """Maps runtime errors to statuses: the user's fault -> 400, the engine's -> 500 (the server keeps serving)."""
    from ecso.runtime.errors import ContextOverflowError

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


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion request, reduced to what ECSO runs."""

    query: str
    image: Optional[LoadedImage]
    options: EcsoOptions
    stream: bool
    include_usage: bool
    turns_dropped: int  # earlier messages not sent to the model (a late system message, an empty message)
    history: tuple = ()  # earlier turns as runtime Messages, sent before the query


def parse_chat_request(body: Any, defaults: EcsoOptions, policy: MediaPolicy, limits: ImageLimits,
                       max_query_chars: int) -> ChatRequest:
    """Validates a decoded JSON body; the image is fetched and decoded here, before the request queues."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list", param="messages")
    _refuse_unsupported(body)
    images: list[str] = []
    last_user_images: list[str] = []
    texts: list[str] = []
    history: list[Message] = []
    dropped = 0
    prev_role = ""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] must be an object with role one of {', '.join(ROLES)}",
                           param=f"messages[{i}].role")
        if i > 0:  # the previous message becomes history
            history, dropped = _add_turn(history, dropped, prev_role, "\n".join(texts))
        texts, found = _content(m.get("content"), i, m["role"])
        prev_role = m["role"]
        images += found
        last_user_images = found
    if messages[-1]["role"] != "user":
        raise ApiError(400, "the last message must be from the user", param="messages")
    if len(last_user_images) > 1:
        raise ApiError(400, "one image per request: the last user message has "
                       f"{len(last_user_images)} images", param="messages")
    query = "\n".join(texts)
    if not query.strip():
        raise ApiError(400, "the query is empty: the last user message has no text", param="messages")
    if len(query) > max_query_chars:
        raise ApiError(400, f"the query has {len(query)} characters, over the limit of {max_query_chars}",
                       "context_length_exceeded", "messages")
    options = _options(body, defaults)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "`stream` must be true or false", param="stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, "`stream_options` must be an object", param="stream_options")
    image = None
    if images:
        data = fetch_image(images[-1], policy)
        try:
            image = load_image(data, limits)
        except ImageError as e:
            raise ApiError(400, str(e).replace("<bytes>", "the image"), "invalid_image", "messages") from None
    return ChatRequest(query, image, options, stream, bool(stream_options.get("include_usage")), dropped,
                       tuple(history))


def _add_turn(history: list[Message], dropped: int, role: str, text: str) -> tuple[list[Message], int]:
    """Appends one earlier message as history, or counts it as dropped (empty, or a system message not first)."""
    role = "system" if role == "developer" else role
    if not text.strip() or (role == "system" and history):
        return history, dropped + 1
    return history + [Message(role, text)], dropped


def _refuse_unsupported(body: dict) -> None:
    n = body.get("n", 1)
    if n not in (1, None):
        raise ApiError(400, "only n=1 is supported (one model, one answer per request)", param="n")
    if body.get("stop"):
        raise ApiError(400, "stop sequences are not supported by this server; remove `stop`", param="stop")
    if body.get("tools") or body.get("functions"):
        raise ApiError(400, "tools / function calling are not supported by this server", param="tools")
    if body.get("logprobs"):
        raise ApiError(400, "logprobs are not supported by this server", param="logprobs")
    fmt = body.get("response_format")
    if fmt not in (None, {}) and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise ApiError(400, "only response_format {\"type\": \"text\"} is supported", param="response_format")


def _content(content: Any, i: int, role: str) -> tuple[list[str], list[str]]:
    """Texts and image URLs of one message's content (a string or a list of OpenAI content parts)."""
    if content is None and role == "assistant":
        return [], []
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise ApiError(400, f"messages[{i}].content must be a string or a list of content parts",
                       param=f"messages[{i}].content")
    texts, images = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise ApiError(400, f"messages[{i}].content[{j}].image_url.url must be a string",
                               param=f"messages[{i}].content[{j}]")
            if role != "user":
                raise ApiError(400, "images are only accepted in user messages", param=f"messages[{i}].content")
            images.append(url)
        else:
            raise ApiError(400, f"messages[{i}].content[{j}]: unsupported content part {kind!r} "
                           "(use text and image_url)", param=f"messages[{i}].content[{j}]")
    return texts, images


def _options(body: dict, defaults: EcsoOptions) -> EcsoOptions:
    over: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ApiError(400, "max_tokens must be a positive integer", param="max_tokens")
        over["max_tokens"] = over["caption_max_tokens"] = max_tokens
    for key, lo, hi in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
        v = body.get(key)
        if v is not None:
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
                raise ApiError(400, f"{key} must be a number in [{lo}, {hi}]", param=key)
            over[key] = float(v)
    if over.get("top_p") == 0.0:
        over["top_p"] = 1e-6  # OpenAI allows 0: the most likely token only
    seed = body.get("seed")
    if seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ApiError(400, "seed must be an integer", param="seed")
        over["seed"] = seed
    extra = body.get("ecso")
    if extra is not None:
        if not isinstance(extra, dict):
            raise ApiError(400, "`ecso` must be an object of ECSO options", param="ecso")
        types = {f.name: type(getattr(defaults, f.name)) for f in fields(EcsoOptions)}
        for key, v in extra.items():
            if key not in OVERRIDABLE:
                raise ApiError(400, f"unknown ECSO option {key!r}; allowed: {', '.join(OVERRIDABLE)}", param="ecso")
            want = types[key]
            ok = isinstance(v, want) and not (want is not bool and isinstance(v, bool))
            if want is float and isinstance(v, int) and not isinstance(v, bool):
                v, ok = float(v), True
            if not ok:
                raise ApiError(400, f"ECSO option {key!r} must be a {want.__name__}", param=f"ecso.{key}")
            over[key] = v
    options = replace(defaults, **over)
    try:
        options.validate()
    except InputError as e:
        raise ApiError(400, str(e)) from None
    return options


# ------------------------------------------------------------------------------------------------------ images
def fetch_image(url: str, policy: MediaPolicy) -> bytes:
    """Image bytes from a `data:` URI, or from an allowed directory / domain; refuses everything else."""
    if url.startswith("data:"):
        return _data_uri(url, policy.max_image_bytes)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        return _local_file(parts, policy)
    if parts.scheme in ("http", "https"):
        return _remote(url, parts, policy)
    raise ApiError(400, "image_url must be a data: URI (data:image/png;base64,...)", "image_url_not_allowed",
                   "messages")


def _too_large(n: int, limit: int) -> ApiError:
    return ApiError(413, f"the image is over {n / 1e6:.1f} MB, more than the limit of {limit / 1e6:.1f} MB",
                    "image_too_large", "messages")


def _data_uri(url: str, limit: int) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise ApiError(400, "image data: URIs must be base64 (data:image/png;base64,...)", "invalid_image", "messages")
    if len(payload) > (limit + 2) // 3 * 4 + 4:
        raise _too_large(len(payload) * 3 // 4, limit)
    try:
        data = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "the image data: URI is not valid base64", "invalid_image", "messages") from None
    if len(data) > limit:
        raise _too_large(len(data), limit)
    return data


def _local_file(parts: urllib.parse.SplitResult, policy: MediaPolicy) -> bytes:
    if not policy.allow_file_dirs:
        raise ApiError(400, "file:// image URLs are refused; send a data: URI, or start the server with "
                       "--allow-file-dir DIR", "image_url_not_allowed", "messages")
    if parts.netloc not in ("", "localhost"):
        raise ApiError(400, "file:// URLs must name a local path", "image_url_not_allowed", "messages")
    path = Path(urllib.request.url2pathname(parts.path)).resolve()
    if not any(path.is_relative_to(Path(d).resolve()) for d in policy.allow_file_dirs):
        raise ApiError(400, "file:// image outside the allowed directories", "image_url_not_allowed", "messages")
    if not path.is_file():
        raise ApiError(400, f"image file not found: {path.name}", "invalid_image", "messages")
    size = path.stat().st_size
    if size > policy.max_image_bytes:
        raise _too_large(size, policy.max_image_bytes)
    return path.read_bytes()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # a redirect could leave the allowed domains
        return None


def _remote(url: str, parts: urllib.parse.SplitResult, policy: MediaPolicy) -> bytes:
    host = (parts.hostname or "").lower()
    allowed = any(host == d.lower().lstrip(".") or (d.startswith(".") and host.endswith(d.lower()))
                  for d in policy.allow_domains)
    if not allowed:
        raise ApiError(400, f"remote image URLs are refused ({host or 'no host'} is not allowed); send a data: URI, "
                       "or start the server with --allow-domain HOST", "image_url_not_allowed", "messages")
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "ecso"}),
                         timeout=policy.fetch_timeout) as r:
            data = r.read(policy.max_image_bytes + 1)
    except urllib.error.HTTPError as e:
        raise ApiError(400, f"could not fetch the image: HTTP {e.code} from {host}", "invalid_image",
                       "messages") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ApiError(400, f"could not fetch the image from {host} ({e})", "invalid_image", "messages") from None
    if len(data) > policy.max_image_bytes:
        raise _too_large(len(data), policy.max_image_bytes)
    return data


# ----------------------------------------------------------------------------------------------------- replies
def finish_reason(result: Result) -> str:
    """`length` when the shown answer hit max_tokens, else `stop`."""
    shown = [s for s in result.steps if s.name in ("answer", "regenerate")]
    return "length" if shown and shown[-1].finish_reason == "length" else "stop"


def usage(result: Result) -> dict:
    """Tokens the whole ECSO request cost: every step's prompt and generated tokens."""
    prompt = sum(s.prompt_positions for s in result.steps)
    completion = sum(s.generated_tokens for s in result.steps)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def ecso_summary(result: Result, queue_seconds: float, turns_dropped: int) -> dict:
    """The extra `ecso` object: verdict, judge reply, caption, timings. Never the unsafe first answer."""
    return {
        "unsafe": result.unsafe, "judge": result.judge, "judge_reply": result.judge_reply,
        "judge_score": result.judge_score, "caption": result.caption, "retracted": result.retracted,
        "image_encodes": result.image_encodes, "image_cache_hit": result.image_cache_hit,
        "prompt_version": result.prompt_version, "decision_rule": result.decision_rule,
        "turns_dropped": turns_dropped,
        "timings": {
            "queue_seconds": round(queue_seconds, 4), "total_seconds": round(result.seconds, 4),
            "steps": [{"name": s.name, "path": s.path, "seconds": round(s.seconds, 4),
                       "prefill_seconds": round(s.prefill_seconds, 4), "generate_seconds": round(s.generate_seconds, 4),
                       "prompt_positions": s.prompt_positions, "reused_positions": s.reused_positions,
                       "evaluated_positions": s.evaluated_positions, "generated_tokens": s.generated_tokens,
                       "image_encodes": s.image_encodes} for s in result.steps],
        },
    }


def completion(rid: str, model: str, fingerprint: str, result: Result, ecso: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": fingerprint,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.answer},
                         "finish_reason": finish_reason(result), "logprobs": None}],
            "usage": usage(result), "ecso": ecso}


def chunk(rid: str, model: str, fingerprint: str, delta: dict, finish: Optional[str] = None,
          **extra: Any) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "system_fingerprint": fingerprint, "choices": choices, **extra}


def models_list(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "ecso"}]}
