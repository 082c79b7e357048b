"""ECSO prompts (verbatim from the paper's released scripts), decision rules and chat formats.

Prompts are versioned: every Result records PROMPT_VERSION and the decision rule, so numbers from different
versions are never mixed silently. Source of the verbatim strings: the paper's released
scripts (gyhdog99/ECSO `llava/eval/model_mmsafe_tell_ask.py`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ecso.runtime.errors import ModelError

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
# the judge names, in the order the CLI lists them; runtime/judges.py holds one strategy object per name
JUDGE_NAMES: tuple[str, ...] = tuple(DATA["judges"])
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
MEDIA_MARKER: str = DATA["media_marker"]  # mtmd's default marker; where the image goes (user text can never contain it)
# stands in for an assistant message while rendering, to find the text a template puts after it
_ANSWER_MARK = "\x00ecso-answer\x00"
CHAT_FORMATS = ("auto", "llava-1.5", "gguf")


class ChatTemplateError(ModelError):
    """The chat template cannot be used: it does not parse, fails to render, or drops the message content."""


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class RenderedPrompt:
    """A rendered prompt cut where the first user turn's content starts.

    `head` is the text before it (system prompt and turn header: what every ECSO step shares). With an image, the
    image goes between head and tail and `tail` starts with "\n" (LLaVA's `<image>\n<query>`); without one,
    `head + tail` is exactly the template's rendering of the messages, and is tokenized whole."""

    head: str
    tail: str
    image: bool

    @property
    def text(self) -> str:
        return self.head + (MEDIA_MARKER if self.image else "") + self.tail


class ChatFormat:
    """Renders messages; the first user turn may carry the image, which goes first in that turn (LLaVA style)."""

    name = "base"

    def render(self, messages: Sequence[Message]) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def prompt(self, messages: Sequence[Message], image: bool) -> RenderedPrompt:
        """Renders with the image (or only a cut) at the start of the first user turn's content."""
        msgs = list(messages)
        idx = next((i for i, m in enumerate(msgs) if m.role == "user"), None)
        if idx is None:
            raise ValueError("a prompt needs a user message")
        marked = list(msgs)
        marked[idx] = Message("user", MEDIA_MARKER + ("\n" if image else "") + msgs[idx].content)
        text = self.render(marked)
        if text.count(MEDIA_MARKER) != 1:
            raise ChatTemplateError(f"the {self.name} chat template does not put the user's message into the prompt "
                                    "verbatim; choose another --chat-format")
        head, _, tail = text.partition(MEDIA_MARKER)
        if image:
            return RenderedPrompt(head, tail, True)
        whole = self.render(msgs)
        if not whole.startswith(head):  # a template that treats the content's start specially: no shared head
            head = ""
        return RenderedPrompt(head, whole[len(head):], False)

    def after_assistant(self, messages: Sequence[Message], image: bool) -> str:
        """The text the template puts after the last message, an assistant turn: what closes that turn and opens
        the next (with `messages` ending in a user turn after it). Raises if the template does not echo the
        assistant's content verbatim, so nothing is ever guessed."""
        msgs = list(messages)
        last = max((i for i, m in enumerate(msgs) if m.role == "assistant"), default=None)
        if last is None:
            raise ValueError("after_assistant needs an assistant message")
        msgs[last] = Message("assistant", _ANSWER_MARK)
        rendered = self.prompt(msgs, image)
        if rendered.tail.count(_ANSWER_MARK) != 1:
            raise ChatTemplateError(f"the {self.name} chat template does not put the assistant's answer into the "
                                    "conversation verbatim; use --judge paper or logit")
        return rendered.tail.partition(_ANSWER_MARK)[2]


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


# what a template may write for an image: tags like <image>, <|image_pad|>, [IMG], and whitespace
_IMAGE_SLOT = re.compile(r"(?:\s|<[^<>\s]{1,48}>|\[[A-Z_]{1,24}\])*")


class JinjaFormat(ChatFormat):
    """The GGUF's own `tokenizer.chat_template`, rendered in a sandbox."""

    name = "gguf-template"

    def __init__(self, template: str, bos_token: str = "", eos_token: str = "", tokenizer_adds_bos: bool = True):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str) -> None:
            raise ChatTemplateError(f"the chat template refused the conversation: {message}")

        env.globals["raise_exception"] = raise_exception
        try:
            self._template = env.from_string(template)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the model's chat template is not valid Jinja ({e}); "
                                    "use --chat-format llava-1.5") from None
        self.bos_token, self.eos_token = bos_token, eos_token
        self.tokenizer_adds_bos = tokenizer_adds_bos

    def render(self, messages: Sequence[Message]) -> str:
        return self._render([{"role": m.role, "content": m.content} for m in messages])

    def prompt(self, messages: Sequence[Message], image: bool) -> RenderedPrompt:
        """With an image, puts it where the family's own template does (see `_template_image_slot`); templates
        that ignore typed content (text-only LLMs, LLaVA-1.5's vicuna) get it first in the turn, LLaVA style."""
        if image:
            placed = self._template_image_slot(messages)
            if placed is not None:
                return placed
        return super().prompt(messages, image)

    def _template_image_slot(self, messages: Sequence[Message]) -> RenderedPrompt | None:
        """Renders the first user turn as HF processors do, typed content `[image, text]`, and again as `[text]`:
        the difference is the template's image placeholder (Qwen2-VL `<|vision_start|><|image_pad|><|vision_end|>`,
        Gemma 3 `<start_of_image>`, SmolVLM `<image>`), which the media marker replaces (mtmd then writes the
        family's own image tokens). None unless that difference is made only of tag-like tokens and whitespace."""
        msgs = [{"role": m.role, "content": m.content} for m in messages]
        idx = next((i for i, m in enumerate(msgs) if m["role"] == "user"), None)
        if idx is None:
            return None
        text = msgs[idx]["content"]
        with_image = [dict(m) for m in msgs]
        with_image[idx]["content"] = [{"type": "image"}, {"type": "text", "text": text}]
        text_only = [dict(m) for m in msgs]
        text_only[idx]["content"] = [{"type": "text", "text": text}]
        try:
            a, b = self._render(with_image), self._render(text_only)
        except Exception:  # a template that cannot take typed content
            return None
        p = 0
        while p < min(len(a), len(b)) and a[p] == b[p]:
            p += 1
        q = 0
        while q < min(len(a), len(b)) - p and a[len(a) - 1 - q] == b[len(b) - 1 - q]:
            q += 1
        slot = a[p:len(a) - q]
        if not _IMAGE_SLOT.fullmatch(slot) or not slot.strip() or text not in a[len(a) - q:] + a[:p]:
            return None
        return RenderedPrompt(a[:p], a[len(a) - q:], True)

    def _render(self, messages: list[dict]) -> str:
        import jinja2

        try:
            text = self._template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                                         eos_token=self.eos_token)
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(f"the model's chat template failed to render ({type(e).__name__}: {e}); "
                                    "use --chat-format llava-1.5") from None
        # BOS is added by the tokenizer (add_special); a template that writes it too would double it.
        if self.tokenizer_adds_bos and self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token):]
        return text


def chat_format_for(name: str, template: str | None, bos_token: str, eos_token: str,
                    tokenizer_adds_bos: bool) -> ChatFormat:
    """The chat format `name` asks for (auto: the GGUF's template when it has one, else vicuna_v1), checked by
    rendering a probe conversation both ways, so a broken template fails here and not in the middle of a request."""
    if name not in CHAT_FORMATS:
        raise ChatTemplateError(f"unknown chat format {name!r}; use one of {', '.join(CHAT_FORMATS)}")
    if name == "llava-1.5" or (name == "auto" and not template):
        fmt: ChatFormat = Llava15Format()
    elif not template:
        raise ChatTemplateError("the model has no chat template; use --chat-format llava-1.5")
    else:
        fmt = JinjaFormat(template, bos_token, eos_token, tokenizer_adds_bos)
    probe = [Message("user", "Hi"), Message("assistant", "Hello"), Message("user", "Bye")]
    fmt.render(probe)
    fmt.prompt(probe[:1], image=True)
    fmt.prompt(probe[:1], image=False)
    return fmt


def neutralize_specials(text: str, specials: Sequence[str]) -> str:
    """Breaks control-token strings in user or model text (e.g. `<|im_end|>`, `</s>`), so text inserted into a
    prompt can never close a turn or forge a system message: a zero-width space goes after the first character."""
    for s in specials:
        if len(s) > 1 and s in text:
            text = text.replace(s, s[0] + DATA["control_token_breaker"] + s[1:])
    return text
