"""The four steps' backend over an OpenAI-compatible chat-completions server (llama-server, vLLM, Ollama, ...).

Each step is one `POST {url}/chat/completions`; images go as PNG data URLs, first in the user turn and followed by
a newline (LLaVA style, as the in-process engine renders them). Reuse is the server's own prefix cache: steps 1-3
start with the same `system + image` prefix, and each step's trace records the cached prompt tokens the server
reports (`usage.prompt_tokens_details.cached_tokens`). A server's cache is not bit-exact the way the in-process
engine's KV reuse is: it may evaluate a prompt's tail in a different batch, and greedy answers can then differ.

What needs the KV cache itself is refused up front: guarded streaming (it branches a judge off the running answer
and rolls it back). Logit judges read the server's `top_logprobs`; a server that returns none fails with a message.
The API key (`ECSO_BACKEND_API_KEY`) is sent as a bearer token and never recorded.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from ecso.runtime.errors import Cancelled, ContextOverflowError, EngineError, InputError
from ecso.runtime.images import ImageLimits, ImageSource, LoadedImage, load_image
from ecso.runtime.prompts import (APPEND_JUDGE_PROMPT, DATA, LOGIT_NO, LOGIT_YES, Message, cap_prompt, gen_prompt,
                                  tell_prompt)
from ecso.runtime.results import EcsoOptions, GenerationSettings, Heads, JudgeQuestion, StepOutput, StepTrace
from ecso.runtime.steps import GuardedAnswer, TextSink

API_KEY_ENV = "ECSO_BACKEND_API_KEY"
TOP_LOGPROBS = 20  # how many next-token candidates a logit judge asks for (yes / no must be among them to count)
RETRY_STATUS = (500, 502, 503, 504)
# control-token spellings of common chat templates; text inserted into a prompt has them broken (a zero-width
# space after the first character), as the in-process engine does with its vocabulary's own control tokens
_CONTROL_TOKENS = re.compile(r"<\|[^<>|\s]{1,40}\|>|</?s>|<(?:start|end)_of_turn>|\[/?INST\]|<__media\w*__>|"
                             r"<image>|<\|?im_(?:start|end)\|?>")


class BackendError(EngineError):
    """The remote server could not be reached, failed, timed out or answered with something that is not a chat
    completion (the message names the server and what to do)."""


@dataclass(frozen=True)
class RemoteConfig:
    """Where the server is and how to talk to it."""

    url: str  # the API base, e.g. http://127.0.0.1:8080/v1
    model: str  # the server's model name (llama-server accepts any; vLLM / Ollama need theirs)
    api_key: Optional[str] = field(default=None, repr=False)  # None: $ECSO_BACKEND_API_KEY (never recorded)
    timeout_s: float = 300.0  # per step request
    retries: int = 2  # connection failures and HTTP 500/502/503/504 are retried this often (backing off)
    retry_backoff_s: float = 0.5
    parallel: int = 4  # requests `Ecso.run_many` keeps in flight (the server batches them)
    max_query_chars: int = 100_000
    image_limits: ImageLimits = field(default_factory=ImageLimits)

    def validate(self) -> None:
        if not re.match(r"^https?://[^/\s]+", self.url or ""):
            raise InputError(f"backend URL {self.url!r} is not an http(s) URL; give e.g. http://127.0.0.1:8080/v1")
        if not self.model:
            raise InputError("the backend needs a model name (--backend-model); llama-server accepts any name")
        if self.timeout_s <= 0 or self.retries < 0 or self.parallel < 1:
            raise InputError("backend timeout must be > 0, retries >= 0 and parallel >= 1")


@dataclass(frozen=True)
class ChatReply:
    """One chat completion as the steps use it."""

    text: str
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    prompt_seconds: Optional[float]
    generate_seconds: float
    top_logprobs: Optional[list[dict]]  # candidates for the first generated token, when asked for and returned
    server_model: Optional[str] = None  # the model name the server reports


class RemoteModel:
    """An OpenAI-compatible server as the model ECSO runs on. Thread-safe: every call is its own HTTP request."""

    def __init__(self, config: RemoteConfig):
        config.validate()
        self.config = config
        self.base_url = config.url.rstrip("/")
        self._api_key = config.api_key if config.api_key is not None else os.environ.get(API_KEY_ENV)

    def describe(self) -> dict:
        return {"backend": "openai-compatible", "url": self.base_url, "model": self.config.model,
                "architecture": "remote", "chat_format": "server"}

    def close(self) -> None:
        """Nothing to release: connections are per request."""

    def __enter__(self) -> "RemoteModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def chat(self, messages: list[dict], settings: GenerationSettings, cache_prompt: bool = True,
             logprobs: bool = False) -> ChatReply:
        body: dict = {"model": self.config.model, "messages": messages, "max_tokens": settings.max_tokens,
                      "temperature": settings.temperature, "top_p": settings.top_p, "seed": settings.seed,
                      "stream": False}
        if not cache_prompt:
            body["cache_prompt"] = False  # llama-server: evaluate the whole prompt (other servers ignore it)
        if logprobs:
            body.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
        started = time.perf_counter()
        data = self.post("/chat/completions", body)
        wall = time.perf_counter() - started
        return self.parse_reply(data, wall, logprobs)

    def post(self, path: str, body: dict) -> dict:
        """POSTs JSON and returns the decoded JSON reply; retries connection failures and 5xx (config.retries)."""
        url = self.base_url + path
        payload = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        attempt = 0
        while True:
            try:
                request = urllib.request.Request(url, data=payload, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
                    raw = response.read()
                break
            except urllib.error.HTTPError as e:
                detail = _error_detail(e)
                if e.code in RETRY_STATUS and attempt < self.config.retries:
                    attempt = self.back_off(attempt)
                    continue
                raise self.http_error(e.code, detail) from None
            except (socket.timeout, TimeoutError):
                raise BackendError(f"the backend at {self.base_url} did not answer within {self.config.timeout_s:g} s; "
                                   "raise --backend-timeout or check the server's load") from None
            except (urllib.error.URLError, ConnectionError, OSError) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, (socket.timeout, TimeoutError)):
                    raise BackendError(f"the backend at {self.base_url} did not answer within "
                                       f"{self.config.timeout_s:g} s; raise --backend-timeout") from None
                if attempt < self.config.retries:
                    attempt = self.back_off(attempt)
                    continue
                raise BackendError(f"cannot reach the backend at {self.base_url} ({reason}); start the server or "
                                   "check --backend") from None
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise BackendError(f"the backend at {self.base_url} answered with a body that is not JSON "
                               f"({raw[:80]!r}); is --backend the server's OpenAI API base (ending in /v1)?") from None

    def back_off(self, attempt: int) -> int:
        time.sleep(min(self.config.retry_backoff_s * (2 ** attempt), 8.0))
        return attempt + 1

    def http_error(self, status: int, detail: str) -> Exception:
        if status in (401, 403):
            return BackendError(f"the backend at {self.base_url} refused the request (HTTP {status}: {detail}); "
                                f"set {API_KEY_ENV} to its API key")
        if status == 400 and "context" in detail.lower() and "exceed" in detail.lower():
            return ContextOverflowError(f"the backend's context is too small for this request ({detail}); "
                                        "lower --max-tokens or start the server with a larger context")
        if status == 404:
            return BackendError(f"the backend at {self.base_url} has no /chat/completions (HTTP 404: {detail}); "
                                "give the OpenAI API base, e.g. http://HOST:PORT/v1")
        return BackendError(f"the backend at {self.base_url} failed (HTTP {status}: {detail})")

    def parse_reply(self, data: dict, wall_seconds: float, logprobs: bool) -> ChatReply:
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
            if not isinstance(text, str):
                raise TypeError("content is not a string")
            finish = choice.get("finish_reason") or "stop"
            usage = data.get("usage") or {}
            details = usage.get("prompt_tokens_details") or {}
            timings = data.get("timings") or {}
            top = None
            if logprobs:
                content = (choice.get("logprobs") or {}).get("content") or []
                top = content[0].get("top_logprobs") if content else None
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise BackendError(f"the backend at {self.base_url} answered with something that is not an OpenAI chat "
                               f"completion ({type(e).__name__}: {e})") from None
        prompt_seconds = timings["prompt_ms"] / 1000 if "prompt_ms" in timings else None
        generate_seconds = timings["predicted_ms"] / 1000 if "predicted_ms" in timings else wall_seconds
        return ChatReply(text=text, finish_reason="stop" if finish == "stop" else finish,
                         prompt_tokens=int(usage.get("prompt_tokens") or 0),
                         cached_tokens=int(details.get("cached_tokens") or 0),
                         completion_tokens=int(usage.get("completion_tokens") or 0),
                         prompt_seconds=prompt_seconds, generate_seconds=generate_seconds, top_logprobs=top,
                         server_model=data.get("model") if isinstance(data.get("model"), str) else None)


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        body = e.read()[:2000].decode("utf-8", errors="replace")
        parsed = json.loads(body)
        message = parsed.get("error", {}).get("message") if isinstance(parsed.get("error"), dict) else None
        return (message or body).strip().replace("\n", " ")[:200]
    except (ValueError, OSError, AttributeError):
        return (e.reason or "no detail") if isinstance(e.reason, str) else "no detail"


def clean_text(text: str) -> str:
    """Breaks control-token spellings in user or model text, so it can never close a turn on the server."""
    return _CONTROL_TOKENS.sub(lambda m: m.group(0)[0] + DATA["control_token_breaker"] + m.group(0)[1:], text)


def png_data_url(image: LoadedImage) -> str:
    """The image as a lossless PNG data URL: the server decodes exactly the pixels ecso checked."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.frombytes("RGB", (image.width, image.height), image.rgb).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def p_yes_from_top_logprobs(candidates: Sequence[dict]) -> float:
    """P(yes) / (P(yes) + P(no)) over the returned candidates whose text is a yes / no spelling (0 when none is)."""
    yes = sum(math.exp(c["logprob"]) for c in candidates if c.get("token") in LOGIT_YES)
    no = sum(math.exp(c["logprob"]) for c in candidates if c.get("token") in LOGIT_NO)
    return yes / (yes + no) if yes + no > 0 else 0.0


class RemoteBackend:
    """The steps' backend on a RemoteModel (see the module docstring)."""

    def __init__(self, model: RemoteModel, image: Optional[ImageSource], query: str, history: Sequence[Message],
                 options: EcsoOptions, heads: Heads = Heads(), should_cancel: Optional[Callable[[], bool]] = None):
        if options.guard_every > 0 and options.defense:
            raise InputError("guarded streaming needs the KV cache itself (it branches a judge off the running "
                             "answer and rolls it back); it is not available with a remote backend")
        self.model, self.options, self.should_cancel = model, options, should_cancel
        self.image = load_image(image, model.config.image_limits) if image is not None else None
        self.image_cache_hit = False  # servers do not say; their cached tokens are in each step's trace
        self.query = clean_text(query)
        self.history = [Message(m.role, clean_text(m.content)) for m in history]
        has_system = bool(self.history) and self.history[0].role == "system"
        system = options.system_prompt
        self.system = [{"role": "system", "content": system}] if system is not None and not has_system else []
        self.image_url = png_data_url(self.image) if self.image is not None else None
        self.server_models: set[str] = set()

    # --- the steps -----------------------------------------------------------------------------------------
    def answer(self, trace: StepTrace, settings: GenerationSettings, on_text: TextSink) -> StepOutput:
        return self.step(trace, self.conversation(), settings, on_text)

    def guarded_answer(self, trace: StepTrace, settings: GenerationSettings, guard_every: int,
                       guard_threshold: float, on_text: TextSink) -> GuardedAnswer:
        raise InputError("guarded streaming is not available with a remote backend")  # refused in __init__ too

    def judge_reply(self, trace: StepTrace, question: JudgeQuestion, answer: StepOutput,
                    settings: GenerationSettings, stop_when: Optional[Callable[[str], bool]]) -> StepOutput:
        # the whole reply is generated (at most judge_max_tokens): stopping early would not change the verdict
        return self.step(trace, self.judge_messages(question, answer), settings)

    def judge_p_yes(self, trace: StepTrace, question: JudgeQuestion, answer: StepOutput) -> float:
        settings = GenerationSettings(max_tokens=1, temperature=0.0, top_p=1.0, seed=self.options.seed)
        reply = self.send(trace, self.judge_messages(question, answer), settings, logprobs=True)
        if not reply.top_logprobs:
            raise BackendError(f"the backend at {self.model.base_url} returned no top_logprobs, which the "
                               f"'{self.options.judge}' judge reads; use --judge paper or append")
        return p_yes_from_top_logprobs(reply.top_logprobs)

    def caption(self, trace: StepTrace, settings: GenerationSettings) -> StepOutput:
        return self.step(trace, self.single_turn(cap_prompt(self.query), with_image=True), settings)

    def regenerate(self, trace: StepTrace, caption: str, settings: GenerationSettings,
                   on_text: TextSink) -> StepOutput:
        text = gen_prompt(clean_text(caption), self.query)
        return self.step(trace, self.single_turn(text, with_image=False), settings, on_text)

    def describe(self) -> dict:
        return {**self.model.describe(), "cache_prompt": self.options.reuse,
                "server_model": sorted(self.server_models)[0] if self.server_models else None}

    # --- messages ------------------------------------------------------------------------------------------
    def user_content(self, text: str, with_image: bool):
        """The image first, then a newline and the text (llama-server joins a media part and the text after it
        without a separator, so the newline makes `<image>\\n<text>`, LLaVA's layout and the engine's)."""
        if not with_image or self.image_url is None:
            return text
        return [{"type": "image_url", "image_url": {"url": self.image_url}}, {"type": "text", "text": "\n" + text}]

    def conversation(self) -> list[dict]:
        """Step 1: system prompt, history and the query; the image goes first in the first user turn."""
        turns = [*self.history, Message("user", self.query)]
        first_user = next(i for i, m in enumerate(turns) if m.role == "user")
        return self.system + [{"role": m.role, "content": self.user_content(m.content, i == first_user)}
                              for i, m in enumerate(turns)]

    def single_turn(self, text: str, with_image: bool) -> list[dict]:
        return self.system + [{"role": "user", "content": self.user_content(text, with_image)}]

    def judge_messages(self, question: JudgeQuestion, answer: StepOutput) -> list[dict]:
        answer_text = clean_text(answer.text.strip())
        if question is JudgeQuestion.TELL:
            return self.single_turn(tell_prompt(self.query, answer_text), with_image=True)
        return self.conversation() + [{"role": "assistant", "content": answer_text},
                                      {"role": "user", "content": APPEND_JUDGE_PROMPT}]

    # --- one request per step ------------------------------------------------------------------------------
    def step(self, trace: StepTrace, messages: list[dict], settings: GenerationSettings,
             on_text: Optional[TextSink] = None) -> StepOutput:
        reply = self.send(trace, messages, settings)
        if on_text is not None and reply.text:
            on_text(reply.text)  # a remote step's text arrives whole
        return StepOutput(text=reply.text, finish_reason=reply.finish_reason)

    def send(self, trace: StepTrace, messages: list[dict], settings: GenerationSettings,
             logprobs: bool = False) -> ChatReply:
        if self.should_cancel is not None and self.should_cancel():
            raise Cancelled("the request was cancelled")
        reply = self.model.chat(messages, settings, cache_prompt=self.options.reuse, logprobs=logprobs)
        if reply.server_model:
            self.server_models.add(reply.server_model)
        trace.prompt_positions += reply.prompt_tokens
        trace.reused_positions += reply.cached_tokens
        trace.evaluated_positions += max(reply.prompt_tokens - reply.cached_tokens, 0)
        trace.generated_tokens += reply.completion_tokens
        trace.prefill_seconds += reply.prompt_seconds or 0.0
        trace.generate_seconds += reply.generate_seconds
        trace.finish_reason = reply.finish_reason
        return reply


def is_backend_url(name: str) -> bool:
    """Whether a model name given to `ecso.load` / the CLI is a server URL rather than a registry name or path."""
    return bool(re.match(r"^https?://", str(name)))

