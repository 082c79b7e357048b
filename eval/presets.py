"""Paper presets: one flag sets the settings a paper published for one benchmark, and run.json records them.

`--preset ecso-paper` (gyhdog99/ECSO's released scripts, LLaVA-1.5-7B): MM-SafetyBench scenarios 01-07 + 09
(eval_mmsafe_loop.sh) in modes SD / TYPO / SD_TYPO, VLSafe, and MME (LLaVA's short-answer line, and step 4 with the
image, as ECSO's released utility script runs it); judge GPT-4 at temperature 0 with ECSO's prompts.
`--preset vlsbench` (AI45Lab/VLSBench): greedy, 128 new tokens, llava_v1's system prompt; judge GPT-4o with the image,
VLSBench's prompt and structured output, 128 tokens.

Each step's published settings are data in paper_settings.py; a preset's deviations are generated from the
differences between them and what ecso runs under the preset (and checked by the tests).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from ecso.eval.mme import LLAVA_SHORT_ANSWER
from ecso.eval.paper_settings import (LLAVA_V1_SYSTEM, PAPER_OF, PUBLISHED, VICUNA_V1_SYSTEM,  # noqa: F401
                                      deviations, ecso_settings, preset_generation)
from ecso.runtime.errors import InputError


@dataclass(frozen=True)
class PaperJudge:
    """The judge a paper used: an OpenAI model, the prompt set, its reply limit and whether it asked for
    structured output."""

    model: Optional[str]  # None: rule scoring (MME)
    prompts: str  # our prompt-set name: "ecso" | "official"
    description: str
    max_tokens: Optional[int] = None  # the paper judge's own max_tokens (None: unset)
    structured: bool = False


@dataclass(frozen=True)
class Preset:
    name: str
    benchmark: str
    source: str
    # generation (EcsoOptions names) and selection
    max_tokens: int
    caption_max_tokens: int
    judge_max_tokens: int
    temperature: float
    system_prompt: str  # every ECSO step's system prompt (EcsoOptions.system_prompt)
    categories: tuple[str, ...] = ()
    modes: tuple[str, ...] = ()
    query_suffix: str = ""
    regenerate_with_image: bool = False  # step 4 sees the image (ECSO's released utility script)
    judge: PaperJudge = PaperJudge(None, "official", "")

    @property
    def judge_reply_max_tokens(self) -> Optional[int]:
        return self.judge.max_tokens

    @property
    def deviations(self) -> tuple[str, ...]:
        """What ecso runs differently from the paper under this preset, generated from the two settings."""
        ours = ecso_settings(preset_generation(asdict(self)))
        return tuple(deviations(PUBLISHED[self.benchmark], ours, f"{PAPER_OF[self.benchmark]}'s release"))

    def record(self) -> dict:
        return {**asdict(self), "deviations": list(self.deviations),
                "published": PUBLISHED[self.benchmark].record()}


_ECSO_STEPS = dict(caption_max_tokens=1024, judge_max_tokens=1024)  # the tell_ask scripts' hard-coded 1024
_GPT4 = "GPT-4 (temperature 0)"

PRESETS: dict[tuple[str, str], Preset] = {
    ("ecso-paper", "mm-safetybench"): Preset(
        "ecso-paper", "mm-safetybench", "gyhdog99/ECSO gen_mmsafe.sh, gen_mmsafe_tell_ask.sh, eval_mmsafe_loop.sh",
        max_tokens=2048, **_ECSO_STEPS, temperature=0.0, system_prompt=VICUNA_V1_SYSTEM,
        categories=("ecso",), modes=("SD", "TYPO", "SD_TYPO"),
        judge=PaperJudge("gpt-4", "ecso", f"{_GPT4} at api.openai.com, ECSO's query_safety prompt, answer only")),
    ("ecso-paper", "vlsafe"): Preset(
        "ecso-paper", "vlsafe", "gyhdog99/ECSO gen_vlsafe.sh, gen_vlsafe_tell_ask.sh, eval_vlsafe.sh",
        max_tokens=2048, **_ECSO_STEPS, temperature=0.0, system_prompt=VICUNA_V1_SYSTEM,
        judge=PaperJudge("gpt-4", "official", f"{_GPT4} at api.openai.com, llm_binary_strict, query + answer")),
    ("ecso-paper", "mme"): Preset(
        "ecso-paper", "mme", "gyhdog99/ECSO gen_mme_unsafe_ask.sh (LLaVA model_vqa_loader + calculation.py)",
        max_tokens=128, **_ECSO_STEPS, temperature=0.0, system_prompt=VICUNA_V1_SYSTEM,
        query_suffix=LLAVA_SHORT_ANSWER, regenerate_with_image=True,
        judge=PaperJudge(None, "official", "MME calculation.py rules (no judge model)")),
    ("vlsbench", "vlsbench"): Preset(
        "vlsbench", "vlsbench", "AI45Lab/VLSBench eval.py, models/load_llava.py, eval_utils.py",
        max_tokens=128, caption_max_tokens=128, judge_max_tokens=16, temperature=0.0, system_prompt=LLAVA_V1_SYSTEM,
        judge=PaperJudge("gpt-4o", "official", "GPT-4o (temperature 0) at api.openai.com with the image, VLSBench's "
                                               "prompt and structured output, 128 tokens", max_tokens=128,
                         structured=True)),
}
PRESET_NAMES = sorted({name for name, _ in PRESETS})


def get_preset(name: str, benchmark: str) -> Preset:
    p = PRESETS.get((name, benchmark))
    if p is None:
        benches = [b for n, b in PRESETS if n == name]
        if not benches:
            raise InputError(f"unknown --preset {name!r}; use one of {', '.join(PRESET_NAMES)}")
        raise InputError(f"--preset {name} has no settings for {benchmark}; it covers {', '.join(benches)}")
    return p


# The papers' judges, for the report header (also when a run used no preset).
PAPER_JUDGES = {
    "mm-safetybench": PRESETS[("ecso-paper", "mm-safetybench")].judge,
    "vlsafe": PRESETS[("ecso-paper", "vlsafe")].judge,
    "vlsbench": PRESETS[("vlsbench", "vlsbench")].judge,
}
