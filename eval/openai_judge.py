"""An OpenAI-compatible chat endpoint as judge (OpenAI, Azure, vLLM, llama.cpp's server, Ollama, `ecso serve` ...).

Which server answered is recorded with every run (`describe`: base URL, host, model asked for) and every judgment
(the model name the reply carries); whether it is the paper's judge is decided from those (paper_judge.py), never
from the model name alone: a local server answers to any model name.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional

from ecso.eval.prompt_judge import JudgeReply, PromptJudge
from ecso.eval.verdicts import JudgeCallError
from ecso.runtime.errors import InputError

# Max reply tokens when --judge-max-tokens is not given: the papers set none (ECSO) or 128 (VLSBench).
OPENAI_MAX_TOKENS = {"vlsbench": 128, "guard": 24}


class OpenAIJudge(PromptJudge):
    """Any OpenAI-compatible chat endpoint. temperature 0; the API key comes from $ECSO_JUDGE_API_KEY or
    $OPENAI_API_KEY when set (never recorded). Images go as base64 data URLs before the text (VLSBench's order),
    with VLSBench's structured-output schema; a server that refuses response_format is asked again without it,
    and every judgment from then on records the fallback."""

    sees_images = True
    can_request_structured = True

    def __init__(self, url: str, model: str, max_tokens: Optional[int] = None, prompt_set: str = "official",
                 send_images: bool = True, timeout: float = 120.0, retries: int = 3, retry_wait: float = 2.0):
        super().__init__(max_tokens, prompt_set)
        if not model:
            raise InputError("an OpenAI-compatible judge needs --judge-model NAME (e.g. gpt-4o)")
        self.endpoint = chat_endpoint(url)
        self.model = model
        self.sees_images = send_images
        self.timeout, self.retries, self.retry_wait = timeout, retries, retry_wait
        self.api_key = os.environ.get("ECSO_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.host = endpoint_host(self.endpoint)
        self.id = f"openai:{model}@{self.host}" + ("" if prompt_set == "official" else f"+{prompt_set}") + \
            ("" if send_images else "+text-only")
        self.structured_refused = ""  # why the server refused response_format (then it is no longer sent)

    def tokens_for(self, task: str) -> Optional[int]:
        return self.max_tokens or OPENAI_MAX_TOKENS.get(task)

    def describe(self) -> dict:
        parts = urllib.parse.urlsplit(self.endpoint)
        return {**super().describe(), "kind": "openai", "base_url": self.endpoint[:-len("/chat/completions")],
                "scheme": parts.scheme, "host": self.host, "hostname": (parts.hostname or "").lower(),
                "model": self.model, "temperature": 0.0,
                "max_tokens_by_task": {t: self.tokens_for(t) for t in ("mm-safetybench", "vlsafe", "vlsbench")}}

    def send(self, messages: list[tuple[str, str]], image: Optional[str], max_tokens: Optional[int],
             structured: Optional[dict]) -> JudgeReply:
        out: list[dict] = []
        for role, text in messages:
            content: object = text
            if image and role == "user" and not any(m["role"] == "user" for m in out):
                try:
                    url = data_url(image)
                except OSError as e:
                    raise JudgeCallError(f"cannot read the image for the judge: {e}") from None
                content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
            out.append({"role": role, "content": content})
        body: dict = {"model": self.model, "temperature": 0.0, "messages": out}
        if max_tokens:
            body["max_tokens"] = max_tokens
        if structured and not self.structured_refused:
            body["response_format"] = {"type": "json_schema", "json_schema": structured}
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.retry_wait * attempt)
            try:
                text, served = self._post(body)
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                last = f"HTTP {e.code} from {self.endpoint}: {detail}"
                if e.code == 400 and "response_format" in body:  # the server does not do structured outputs
                    body.pop("response_format")
                    self.structured_refused = f"the server refused response_format ({last[:160]})"
                elif e.code < 500 and e.code != 429:
                    break
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = f"cannot reach {self.endpoint}: {getattr(e, 'reason', e)}"
                continue
            except ValueError as e:
                last = f"bad reply from {self.endpoint}: {e}"
                continue
            dropped = self.structured_refused if structured else ""
            return JudgeReply(text, served, dropped)
        raise JudgeCallError(last)

    def _post(self, body: dict) -> tuple[str, Optional[str]]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.endpoint, json.dumps(body).encode(), headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            data = json.loads(r.read().decode("utf-8"))
        try:
            message = data["choices"][0]["message"]
        except (KeyError, IndexError, TypeError):
            raise ValueError("no choices[0].message in the reply") from None
        if message.get("content") is None:
            raise ValueError(f"no content (refusal: {message.get('refusal')!r})")
        served = data.get("model")
        return message["content"], served if isinstance(served, str) else None


def chat_endpoint(url: str) -> str:
    """http://host:port[/v1][/chat/completions] -> the full /v1/chat/completions URL (credentials in the URL are
    refused: they would end up in run.json)."""
    u = url.strip().rstrip("/")
    if not re.match(r"^https?://", u):
        raise InputError(f"judge URL {url!r} must start with http:// or https://")
    if urllib.parse.urlsplit(u).username is not None:
        raise InputError("put no user or password into the judge URL; use $ECSO_JUDGE_API_KEY or $OPENAI_API_KEY")
    if u.endswith("/chat/completions"):
        return u
    if re.search(r"/v\d+$", u):
        return u + "/chat/completions"
    return u + "/v1/chat/completions"


def endpoint_host(endpoint: str) -> str:
    """host[:port] of an endpoint URL, lowercased (the port only when the URL names one)."""
    parts = urllib.parse.urlsplit(endpoint)
    host = (parts.hostname or "").lower()
    return f"{host}:{parts.port}" if parts.port is not None else host


def data_url(path: str) -> str:
    mime = mimetypes.guess_type(path)[0] or "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()
