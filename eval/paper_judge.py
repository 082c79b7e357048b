"""Is a run's judge the paper's? Decided from what was recorded, never from the model name alone.

The paper's judge is OpenAI's own API (https://api.openai.com) serving the paper's model: `gpt-4` for ECSO's
tables, `gpt-4o` for VLSBench's; a dated snapshot of that model (`gpt-4o-2024-08-06`, `gpt-4-0613`) counts and is
named in the statement. Anything else is not the paper's judge whatever model name it was given: localhost, Azure
deployments and every other OpenAI-compatible server answer to any model name. It must also use the paper's prompt
set and reply limit, see the image where the paper's did, reply as the model asked for when the server says which
model replied, and, where the paper asked for structured output (VLSBench), honour it in every judgment: a reply
that is not exactly the schema is a fallback, and one fallback makes the run not the paper's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from ecso.eval.presets import PAPER_JUDGES
from ecso.eval.verdicts import STRUCTURED_FALLBACK

OPENAI_API_HOST = "api.openai.com"


def snapshot_of(name: str, model: str) -> bool:
    """`name` is `model` itself or one of its dated snapshots (gpt-4o-2024-08-06, gpt-4-0613), not a sibling model
    (gpt-4o-mini, gpt-4-turbo, gpt-4-1106-preview)."""
    return name == model or re.fullmatch(re.escape(model) + r"-(?:\d{4}-\d{2}-\d{2}|\d{4})", name) is not None


@dataclass
class JudgeCheck:
    is_paper: Optional[bool]  # None: no paper's table for this benchmark
    statement: str
    reasons: list = field(default_factory=list)  # why not the paper's
    structured_fallbacks: int = 0
    served_models: list = field(default_factory=list)


def check_judge(benchmark: str, judge_id: Optional[str], details: Optional[dict],
                judgments: list[dict]) -> JudgeCheck:
    """`details`: the judge's description recorded in run.json (`judge_details`); `judgments`: its records."""
    paper = PAPER_JUDGES.get(benchmark)
    if paper is None:
        return JudgeCheck(None, "No paper's table exists for this set: nothing to compare with.")
    if not judge_id:
        return JudgeCheck(False, f"No judge yet. The paper's judge: {paper.description}.", ["no judge"])
    d = details or {}
    reasons: list[str] = []
    served = sorted({j["served_model"] for j in judgments if j.get("served_model")})
    fallbacks = [j for j in judgments if j.get("structured") == STRUCTURED_FALLBACK]
    if not d:
        reasons.append("the run records no host or model for this judge (written before ecso recorded them)")
    elif d.get("kind") != "openai" or d.get("guard"):
        reasons.append(f"it is a {'guard' if d.get('guard') else d.get('kind', '?')} judge, not OpenAI's API")
    else:
        if d.get("hostname") != OPENAI_API_HOST or d.get("scheme") != "https":
            reasons.append(f"it runs at {d.get('base_url')} (host {d.get('host')}), not OpenAI's own API "
                           f"(https://{OPENAI_API_HOST}); a server answers to any model name")
        if not snapshot_of(d.get("model") or "", paper.model or ""):
            reasons.append(f"model {d.get('model')!r} is not {paper.model} or a dated snapshot of it")
        wrong = [m for m in served if not snapshot_of(m, paper.model or "")]
        if wrong:
            reasons.append(f"the server says {', '.join(wrong)} replied")
        if d.get("prompt_set") != paper.prompts:
            reasons.append(f"prompt set {d.get('prompt_set')!r}, the paper's is {paper.prompts!r}")
        if benchmark == "vlsbench" and not d.get("sees_images"):
            reasons.append("it did not see the images (the paper's judge did)")
        limit = (d.get("max_tokens_by_task") or {}).get(benchmark)
        if limit != paper.max_tokens:
            reasons.append(f"reply limit {limit} tokens, the paper's {paper.max_tokens or 'unset'}")
    if paper.structured and fallbacks:
        reasons.append(f"structured output was not honoured in {len(fallbacks)} of {len(judgments)} judgments "
                       f"(first: {fallbacks[0].get('structured_why')})")
    check = JudgeCheck(not reasons, "", reasons, len(fallbacks), served)
    if reasons:
        check.statement = (f"**Not the paper's judge**: {'; '.join(reasons)}. The paper's judge: "
                           f"{paper.description}. These numbers are not comparable with the paper's table.")
    else:
        snap = [m for m in [d.get("model"), *served] if m and m != paper.model]
        named = f" ({', '.join(dict.fromkeys(snap))}: a dated snapshot of {paper.model})" if snap else ""
        check.statement = f"The paper's judge{named}: {paper.description}."
    return check
