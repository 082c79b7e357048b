"""Judges that read a prompt: the benchmark's verbatim judge prompt for one response, and the base class that
sends it through a transport (a local GGUF or an OpenAI-compatible server), parses the reply with the benchmark's
own rule and records what the judge saw and whether structured output was honoured."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

from ecso.eval import judge_prompts as P
from ecso.eval.verdicts import (PARSERS, STRUCTURED, STRUCTURED_FALLBACK, STRUCTURED_HONOURED, JudgeCallError,
                                JudgeInput, Judgment, parse_harm)
from ecso.runtime.errors import InputError


@dataclass(frozen=True)
class JudgePrompt:
    name: str
    system: str
    user: str
    image: Optional[str] = None  # sent to judges that can see images
    text_only_user: Optional[str] = None  # the variant for judges that cannot (VLSBench: image description)
    note_text_only: str = ""


@dataclass(frozen=True)
class JudgeReply:
    """What a transport got back: the text, the model name the server's reply carries (None: not reported), and
    why structured output was dropped for this call ("": it was not, or none was asked for)."""

    text: str
    served_model: Optional[str] = None
    structured_dropped: str = ""


def build_prompt(item: JudgeInput, prompt_set: str = "official") -> JudgePrompt:
    """The benchmark's judge prompt for one response. prompt_set "ecso" uses ECSO's copy of the MM-SafetyBench
    safety template (scenarios 01-07, 09); the scenario-specific ones are the same in both sets."""
    b = item.benchmark
    if b in ("mm-safetybench", "custom"):
        kind = P.MMSB_SCENARIO_TEMPLATE.get(item.category[:2], "safety") if b == "mm-safetybench" else "safety"
        if kind == "safety" and prompt_set == "ecso":
            return JudgePrompt("ecso/query_safety", P.JUDGE_SYSTEM_PROMPT,
                               P.ECSO_QUERY_SAFETY.format(answer=item.response))
        return JudgePrompt(f"mm-safetybench/{kind}", P.JUDGE_SYSTEM_PROMPT,
                           P.MMSB_TEMPLATES[kind].format(prediction=item.response))
    if b == "vlsafe":
        return JudgePrompt("ecso/llm_binary_strict", P.JUDGE_SYSTEM_PROMPT,
                           P.VLSAFE_BINARY_STRICT.format(question=item.query, answer=item.response))
    if b == "vlsbench":
        user = P.VLSBENCH_JUDGE.format(question=item.query.strip(), response=item.response.strip())
        desc = (item.image_description or "").strip()
        if desc:
            text_user = user.replace(P.VLSBENCH_IMAGE_LINE, P.VLSBENCH_DESCRIPTION_LINE.format(description=desc), 1)
            note = "text-only judge: data.json image_description given in place of the image"
        else:
            text_user, note = user, "text-only judge: no image_description in data.json; the judge saw no image"
        return JudgePrompt("vlsbench/judge", P.JUDGE_SYSTEM_PROMPT, user, item.image, text_user, note)
    raise InputError(f"no judge prompt for benchmark {b!r}")


def text_harm_prompt(query: str) -> JudgePrompt:
    return JudgePrompt(f"leakage/text/{P.LEAKAGE_PROMPT_VERSION}", P.JUDGE_SYSTEM_PROMPT,
                       P.LEAKAGE_PROMPT.format(query=query))


def pair_harm_prompt(query: str, image: str) -> JudgePrompt:
    return JudgePrompt(f"leakage/pair/{P.PAIR_PROMPT_VERSION}", P.JUDGE_SYSTEM_PROMPT,
                       P.PAIR_HARM_PROMPT.format(query=query), image)


class PromptJudge:
    """Builds the benchmark's prompt, sends it, parses with the benchmark's rule; failures are recorded.
    Subclasses are transports: `send` delivers role/content messages (and an image, when the judge sees images)."""

    id: str
    sees_images = False
    can_request_structured = False  # True: `send` passes a JSON schema on as the server's response_format

    def __init__(self, max_tokens: Optional[int], prompt_set: str):
        self.max_tokens = max_tokens
        self.prompt_set = prompt_set

    def send(self, messages: list[tuple[str, str]], image: Optional[str], max_tokens: Optional[int],
             structured: Optional[dict]) -> JudgeReply:
        """The judge's reply; raises JudgeCallError when the call fails."""
        raise NotImplementedError

    def tokens_for(self, task: str) -> Optional[int]:
        return self.max_tokens

    def describe(self) -> dict:
        """Who this judge is, for run.json (where it runs, which model, its settings)."""
        return {"id": self.id, "max_tokens": self.max_tokens, "prompt_set": self.prompt_set,
                "sees_images": self.sees_images}

    def judge(self, item: JudgeInput) -> Judgment:
        prompt = build_prompt(item, self.prompt_set)
        return self._ask(prompt, PARSERS[item.benchmark], self.tokens_for(item.benchmark),
                         STRUCTURED.get(item.benchmark), "answer")

    def text_harm(self, query: str) -> Judgment:
        return self._ask(text_harm_prompt(query), parse_harm, self.tokens_for("harm"), None, "")

    def pair_harm(self, query: str, image: str) -> Judgment:
        """Is the image + text request harmful? Only for judges that see images (the leakage pair view)."""
        return self._ask(pair_harm_prompt(query, image), parse_harm, self.tokens_for("harm"), None, "")

    def _ask(self, prompt: JudgePrompt, parse, max_tokens: Optional[int], structured: Optional[tuple],
             answer_part: str) -> Judgment:
        note = ""
        image = prompt.image if self.sees_images else None
        if prompt.text_only_user is not None and image is None:
            note = prompt.note_text_only
            prompt = JudgePrompt(prompt.name, prompt.system, prompt.text_only_user)
        saw = what_was_seen(prompt.name, bool(image), note, answer_part)
        schema = structured[0] if structured and self.can_request_structured else None
        t0 = time.perf_counter()
        try:
            reply = self.send([("system", prompt.system), ("user", prompt.user)], image, max_tokens, schema)
        except JudgeCallError as e:
            return Judgment(None, None, "error", "", self.id, prompt.name, note, str(e), time.perf_counter() - t0,
                            saw)
        label, score, status = parse(reply.text)
        out = Judgment(label, score, status, reply.text, self.id, prompt.name, note,
                       seconds=time.perf_counter() - t0, saw=saw, served_model=reply.served_model)
        if structured:
            why = ("this judge cannot be asked for structured output" if schema is None else
                   reply.structured_dropped or structured[1](reply.text))
            out.structured, out.structured_why = (STRUCTURED_FALLBACK, why) if why else (STRUCTURED_HONOURED, "")
        return out

    def close(self) -> None:
        pass


def what_was_seen(prompt_name: str, image: bool, note: str, answer_part: str) -> str:
    parts = ["image" if image else ("image description" if "image_description given" in note else "")]
    if not prompt_name.startswith("mm-safetybench/") and prompt_name != "ecso/query_safety":
        parts.append("query text")  # MM-SafetyBench's judge reads the answer alone
    parts.append(answer_part)
    return " + ".join(p for p in parts if p)
