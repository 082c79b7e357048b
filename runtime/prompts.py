"""ECSO prompts (verbatim from the paper's released scripts), decision rules and chat formats.

Prompts are versioned: every Result records PROMPT_VERSION and the decision rule, so numbers from different
versions are never mixed silently. Source of the verbatim strings: ../shared/reference/ecso-method-and-benchmarks.md
(gyhdog99/ECSO `llava/eval/model_mmsafe_tell_ask.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

# The strings and rules live in ecso_prompts.json, the one source of truth shared with the native engine (libecso
# compiles the same file in): nothing below restates them.
DATA: dict = json.loads((Path(__file__).with_name("ecso_prompts.json")).read_text(encoding="utf-8"))

PROMPT_VERSION: str = DATA["prompt_version"]
# --- verbatim from the paper's eval scripts -------------------------------------------------------------------
TELL_PROMPT: str = DATA["tell"]
CAP_PROMPT: str = DATA["cap"]
GEN_PROMPT: str = DATA["gen"]
TELL_RESPONSE_CHARS: int = DATA["tell_response_chars"]  # the response is cut to its first 1927 characters

# --- beyond the paper (ours; off by default) -------------------------------------------------------------------
# Appended to the running conversation as a new user turn: query and response are already in the KV cache.
APPEND_JUDGE_PROMPT: str = DATA["append_judge"]

LLAVA15_SYSTEM: str = DATA["llava15"]["system"]

DECISION_RULES = tuple(DATA["decision_rules"])
LOGIT_YES: tuple[str, ...] = tuple(DATA["logit_words"]["yes"])  # single-token spellings for the logit judges
LOGIT_NO: tuple[str, ...] = tuple(DATA["logit_words"]["no"])


def tell_prompt(query: str, response: str) -> str:
    return TELL_PROMPT.format(query, response[:TELL_RESPONSE_CHARS])


def cap_prompt(query: str) -> str:
    return CAP_PROMPT.format(query)


def gen_prompt(caption: str, query: str) -> str:
    return GEN_PROMPT.format(caption, query)


def is_unsafe_reply(reply: str, rule: str = "exact") -> bool:
    """The paper's rule: unsafe iff the reply, stripped and lowercased, is exactly `yes` or `yes.`.
    `contains` is the looser rule some ports use (any "yes" substring; fires on "eyes" too)."""
    text = reply.strip().lower()
    spec = DATA["decision_rules"].get(rule)
    if spec is not None:
        if "equals_any" in spec:
            return text in spec["equals_any"]
        return spec["contains"] in text
    raise ValueError(f"unknown decision rule {rule!r}; use one of {DECISION_RULES}")


def reply_can_still_be_unsafe(partial_reply: str, rule: str = "exact") -> bool:
    """Whether a judge reply that starts with `partial_reply` could still be judged unsafe: under the exact rule
    the judge stops generating once it cannot (same verdict, fewer tokens)."""
    spec = DATA["decision_rules"][rule]
    text = partial_reply.strip().lower()
    if "equals_any" in spec:
        return any(v.startswith(text) for v in spec["equals_any"])
    return True


# --- chat formats -----------------------------------------------------------------------------------------------
MEDIA_MARKER: str = DATA["media_marker"]  # mtmd's default marker; we split on it ourselves
_SPLIT = "\x00ecso-split\x00"  # where a text-only user turn starts, so it shares the prefix of an image turn


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt cut into the part shared by every ECSO step (`head`) and the rest. `image` tells whether the
    image goes between them; tail starts with the user's text (after "\\n" when an image precedes it)."""

    head: str
    tail: str
    image: bool


class ChatFormat:
    """Renders messages; the last user turn may carry the image, which goes first in that turn (LLaVA style)."""

    name = "base"

    def render(self, messages: Sequence[Message]) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def prompt(self, messages: Sequence[Message], image: bool) -> RenderedPrompt:
        """Renders with the image (or a split mark) at the start of the first user turn's content."""
        msgs = list(messages)
        idx = next(i for i, m in enumerate(msgs) if m.role == "user")
        lead = MEDIA_MARKER + "\n" if image else _SPLIT
        msgs[idx] = Message("user", lead + msgs[idx].content)
        text = self.render(msgs)
        mark = MEDIA_MARKER if image else _SPLIT
        head, _, tail = text.partition(mark)
        return RenderedPrompt(head, tail, image)


class Llava15Format(ChatFormat):
    """vicuna_v1, as LLaVA-1.5's eval scripts use it: `<system> USER: <image>\\n<q> ASSISTANT:`."""

    name = "llava-1.5"

    def __init__(self, system: str = LLAVA15_SYSTEM):
        self.system = system

    def render(self, messages: Sequence[Message]) -> str:
        system = self.system
        rest = list(messages)
        if rest and rest[0].role == "system":
            system, rest = rest[0].content, rest[1:]
        fmt = DATA["llava15"]
        out = system + fmt["after_system"]
        for m in rest:
            out += (fmt["user"] if m.role == "user" else fmt["assistant"]).replace("{}", m.content, 1)
        return out + fmt["generation"]


class JinjaFormat(ChatFormat):
    """The GGUF's own `tokenizer.chat_template`, rendered in a sandbox."""

    name = "gguf-template"

    def __init__(self, template: str, bos_token: str = "", eos_token: str = "", tokenizer_adds_bos: bool = True):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str) -> None:
            raise ValueError(f"chat template error: {message}")

        env.globals["raise_exception"] = raise_exception
        self._template = env.from_string(template)
        self.bos_token, self.eos_token = bos_token, eos_token
        self.tokenizer_adds_bos = tokenizer_adds_bos

    def render(self, messages: Sequence[Message]) -> str:
        text = self._template.render(messages=[{"role": m.role, "content": m.content} for m in messages],
                                     add_generation_prompt=True, bos_token=self.bos_token,
                                     eos_token=self.eos_token)
        # BOS is added by the tokenizer (add_special); a template that writes it too would double it.
        if self.tokenizer_adds_bos and self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token):]
        return text


def neutralize_specials(text: str, specials: Sequence[str]) -> str:
    """Breaks control-token strings typed by a user (e.g. `<|im_end|>`), so user text can never close a turn or
    forge a system message: a zero-width space goes after the first character."""
    for s in specials:
        if len(s) > 1 and s in text:
            text = text.replace(s, s[0] + DATA["control_token_breaker"] + s[1:])
    return text
