"""Judges: each reads one response with the benchmark's own prompt and its own parse rule and returns a Judgment.

- RuleJudge (rule_judge.py): offline refusal / warning / compliance patterns, instant, no model.
- LocalLLMJudge: a local GGUF through ecso.runtime's Engine, with the benchmark's verbatim prompt; with a vision
  projector it sees the images (VLSBench's judge, the image + text view of leakage).
- OpenAIJudge (openai_judge.py, opt-in): any OpenAI-compatible /v1/chat/completions endpoint via urllib, to match
  the papers' GPT-4 / GPT-4o judges (the report decides from the recorded host and model whether it is theirs).
- GuardJudge: a guard model (Llama Guard 3) over either transport, with its own format (see guard.py).

Labels, parse rules and what a judgment records: verdicts.py. Prompts and the shared ask / parse logic:
prompt_judge.py. This module also re-exports those names, so `from ecso.eval.judges import ...` finds every judge.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from ecso.eval.guard import GUARD_PROMPT_NAME, category_names, guard_verdict, looks_like_guard_template
from ecso.eval.openai_judge import OPENAI_MAX_TOKENS, OpenAIJudge, chat_endpoint, data_url  # noqa: F401
from ecso.eval.prompt_judge import (JudgePrompt, JudgeReply, PromptJudge, build_prompt,  # noqa: F401
                                    pair_harm_prompt, text_harm_prompt)
from ecso.eval.rule_judge import RULE_JUDGE_VERSION, RuleJudge  # noqa: F401
from ecso.eval.verdicts import (PARSERS, SAFE_LABELS, VLSBENCH_LABELS, VLSBENCH_SCHEMA, JudgeCallError,  # noqa: F401
                                JudgeInput, Judgment, parse_harm, parse_mmsb, parse_vlsafe, parse_vlsbench)
from ecso.runtime.errors import InputError

__all__ = ["GuardJudge", "JudgeCallError", "JudgeInput", "JudgePrompt", "JudgeReply", "Judgment", "LocalLLMJudge",
           "OPENAI_MAX_TOKENS", "OpenAIJudge", "PARSERS", "PromptJudge", "RULE_JUDGE_VERSION", "RuleJudge",
           "SAFE_LABELS", "VLSBENCH_LABELS", "VLSBENCH_SCHEMA", "build_prompt", "chat_endpoint", "check_guard_template",
           "data_url", "pair_harm_prompt", "parse_harm", "parse_mmsb", "parse_vlsafe", "parse_vlsbench",
           "text_harm_prompt"]
# Max reply tokens of a local judge when --judge-max-tokens is not given: enough for the expected reply.
LOCAL_MAX_TOKENS = {"mm-safetybench": 16, "custom": 16, "vlsafe": 384, "vlsbench": 256, "harm": 8, "guard": 24}


class LocalLLMJudge(PromptJudge):
    """A local GGUF (any instruct model) as judge, greedy, via Engine.chat. With `sees_images` (the engine has a
    vision projector) the image goes first in the user turn, as the model was trained; else the judge is text only.
    Any failure (a chat template that rejects the system role, a prompt over the context) is a failed call."""

    def __init__(self, engine, max_tokens: Optional[int] = None, prompt_set: str = "official",
                 owns_engine: bool = False, sees_images: bool = False):
        super().__init__(max_tokens, prompt_set)
        self.engine = engine
        self.owns_engine = owns_engine
        self.sees_images = bool(sees_images and engine.has_vision)
        name = Path(engine.config.model).name
        self.id = f"llm:{name}@{engine.model_fingerprint}" + ("" if prompt_set == "official" else f"+{prompt_set}") + \
            ("+vision" if self.sees_images else "")

    def tokens_for(self, task: str) -> Optional[int]:
        return self.max_tokens or LOCAL_MAX_TOKENS.get(task, 64)

    def send(self, messages: list[tuple[str, str]], image: Optional[str], max_tokens: Optional[int],
             structured: Optional[dict]) -> JudgeReply:
        from jinja2 import TemplateError

        from ecso.runtime import EcsoError, Message, Sampling

        e = self.engine
        msgs = [Message(role, e.clean_user_text(text)) for role, text in messages]
        try:
            return JudgeReply(e.chat(msgs, image=image, sampling=Sampling(0.0, 1.0, 0, max_tokens or 64)).text)
        except (EcsoError, ValueError, TemplateError) as err:  # ValueError: the chat template's raise_exception
            raise JudgeCallError(f"local judge failed: {type(err).__name__}: {err}") from None

    def describe(self) -> dict:
        c = self.engine.config
        return {**super().describe(), "kind": "llm", "host": None, "where": "in-process (a local GGUF)",
                "model": str(c.model), "model_fingerprint": self.engine.model_fingerprint,
                "mmproj": str(c.mmproj) if c.mmproj else None}

    def close(self) -> None:
        if self.owns_engine:
            self.engine.close()


class GuardJudge:
    """A guard model (Llama Guard 3) as judge, over a local GGUF or an OpenAI-compatible server (`transport`).
    It gets the conversation itself, no system message and no benchmark prompt: its chat template adds its policy.
    A local GGUF must carry a Llama Guard chat template (checked here, before any judging)."""

    sees_images = False  # Llama Guard 3 (8B / 1B) reads text; it never gets an image + text pair (no R1 / R2)

    def __init__(self, transport: PromptJudge):
        self.transport = transport
        self.id = "guard:" + transport.id
        if isinstance(transport, LocalLLMJudge):
            check_guard_template(transport.engine)

    def judge(self, item: JudgeInput) -> Judgment:
        note = ""
        if item.benchmark == "vlsbench":
            note = "guard judge: safe is not split into refusal / warning; it did not see the image"
        return self._ask([("user", item.query), ("assistant", item.response)], item.benchmark,
                         "query text + answer", note)

    def text_harm(self, query: str) -> Judgment:
        return self._ask([("user", query)], "harm", "query text", "")

    def _ask(self, messages: list[tuple[str, str]], benchmark: str, saw: str, note: str) -> Judgment:
        t0 = time.perf_counter()
        try:
            reply = self.transport.send(messages, None, self.transport.tokens_for("guard"), None)
        except JudgeCallError as e:
            return Judgment(None, None, "error", "", self.id, GUARD_PROMPT_NAME, note, str(e),
                            time.perf_counter() - t0, saw)
        label, score, status, codes = guard_verdict(benchmark, reply.text)
        if codes:
            note = "; ".join(x for x in (note, "categories: " + ", ".join(category_names(codes))) if x)
        return Judgment(label, score, status, reply.text, self.id, GUARD_PROMPT_NAME, note,
                        seconds=time.perf_counter() - t0, saw=saw, categories=codes, served_model=reply.served_model)

    def describe(self) -> dict:
        return {**self.transport.describe(), "id": self.id, "guard": True}

    def close(self) -> None:
        self.transport.close()


def check_guard_template(engine) -> None:
    """Raises InputError unless the engine's chat template is a Llama Guard one (it wraps the conversation in the
    safety policy and asks for safe / unsafe)."""
    from ecso.runtime import Message

    try:
        rendered = engine.chat_format.render([Message("user", "hello"), Message("assistant", "hi")])
    except Exception as e:  # noqa: BLE001 - any template failure means: not a usable guard template
        rendered = f"({type(e).__name__}: {e})"
    if not looks_like_guard_template(rendered):
        raise InputError(f"{Path(engine.config.model).name} has no Llama Guard chat template (no safety policy with "
                         "'safe' or 'unsafe' in its prompt); --judge guard needs a Llama Guard 3 GGUF, or use "
                         "--judge llm for an instruct model")
