"""What an evaluation run is: its configuration (`EvalConfig`, `JudgeSpec`), what it reports back (`EvalSummary`),
and what must stay the same for a run folder to be continued (`generation_identity`, `check_resumable`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ecso.runtime import EcsoOptions, EngineConfig, InputError, PROMPT_VERSION, RemoteConfig

DEFENSES = ("none", "ecso")
RUN_FORMAT = 1


@dataclass(frozen=True)
class JudgeSpec:
    """Which judge reads the answers: rule | llm (a local GGUF; default the demo model) | openai (URL) |
    guard (a Llama Guard GGUF, or with a URL a guard behind an OpenAI-compatible server) | none."""

    kind: str = "rule"
    model: Optional[str] = None  # llm / guard: GGUF path or registry name; openai / guard with URL: the model name
    url: Optional[str] = None
    mmproj: Optional[str] = None  # llm: a vision projector, so the judge sees images (default: the registry's)
    max_tokens: Optional[int] = None  # None: per-benchmark default
    n_ctx: int = 4096
    prompt_set: str = "official"  # MM-SafetyBench: official (evaluation.py) | ecso (ECSO's query_safety copy)
    send_images: bool = True  # openai + VLSBench: send the image (as the paper) or the image description
    retries: int = 3  # openai: retries of a failed call (5xx, 429, network), waiting retry_wait * attempt seconds
    retry_wait: float = 2.0

    @classmethod
    def parse(cls, judge: str, model: Optional[str] = None, **kw) -> "JudgeSpec":
        j = judge.strip()
        if j.startswith("openai:"):
            return cls("openai", model, j[len("openai:"):], **kw)
        if j.startswith("guard:"):
            return cls("guard", model, j[len("guard:"):], **kw)
        if j in ("rule", "llm", "guard", "none"):
            return cls(j, model, None, **kw)
        raise InputError(f"unknown --judge {judge!r}; use rule, llm, guard, guard:URL, openai:URL or none")

    def validate(self) -> None:
        """Fails before any generation, not after hours of it."""
        if self.url is not None:
            from ecso.eval.openai_judge import chat_endpoint

            chat_endpoint(self.url)
            if not self.model:
                raise InputError("an OpenAI-compatible judge needs --judge-model NAME (e.g. gpt-4o, llama-guard3)")
        if self.kind == "guard" and self.url is None and not self.model:
            raise InputError("--judge guard needs --judge-model: a Llama Guard 3 GGUF (or guard:URL for a server)")
        if self.kind in ("llm", "guard") and self.url is None:
            model = self.local_model()
            if self.kind == "guard":
                from ecso.eval.guard import gguf_has_guard_template

                if not gguf_has_guard_template(model):
                    raise InputError(f"{Path(model).name} has no Llama Guard chat template; --judge guard needs a "
                                     "Llama Guard 3 GGUF (or use --judge llm for an instruct model)")
        if self.prompt_set not in ("official", "ecso"):
            raise InputError(f"unknown judge prompt set {self.prompt_set!r}; use official or ecso")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InputError("--judge-max-tokens must be at least 1")

    def local_model(self) -> str:
        return self.local_files()[0]

    def local_files(self) -> tuple[str, Optional[str]]:
        """(GGUF, vision projector or None) of a local judge: a path, or a registered name (default: the demo
        model). A registered name brings its projector; --judge-mmproj sets one explicitly."""
        from ecso.models.registry import resolve

        model, mmproj = self.model or "demo", self.mmproj
        if not model.endswith(".gguf") and not Path(model).exists():
            entry = resolve(model)
            model, mmproj = entry.model, mmproj or entry.mmproj
        if not Path(model).is_file():
            raise InputError(f"judge model {model} not found; give --judge-model a GGUF file or a registered name")
        if mmproj and not Path(mmproj).is_file():
            raise InputError(f"judge projector {mmproj} not found; give --judge-mmproj an mmproj GGUF")
        return model, mmproj


@dataclass
class EvalConfig:
    benchmark: str
    data: str
    out: str
    engine: EngineConfig
    options: EcsoOptions = field(default_factory=EcsoOptions)
    defenses: tuple[str, ...] = DEFENSES
    categories: tuple[str, ...] = ()
    modes: tuple[str, ...] = ()
    limit: Optional[int] = None
    images: Optional[str] = None
    judge: JudgeSpec = field(default_factory=JudgeSpec)
    leakage: bool = False
    query_suffix: str = ""  # appended to every query (MME: LLaVA's short-answer line)
    # ECSO's step 4 sees the image again (ECSO's released MME / MM-Vet script does; the method, and ecso by default,
    # answer without it): after the eyes-closed step 4 the final answer is generated again with the image
    regenerate_with_image: bool = False
    preset: Optional[dict] = None  # presets.Preset.record(), kept in run.json
    force: bool = False
    retry_errors: bool = False
    progress: bool = True
    backend: Optional[RemoteConfig] = None  # generation on an OpenAI-compatible server (then `engine` only judges)


@dataclass
class EvalSummary:
    run_dir: str
    benchmark: str
    n_samples: int = 0
    n_input_errors: int = 0  # missing images, malformed rows (recorded, counted, not run)
    generated: int = 0  # responses written by this invocation
    reused: int = 0  # responses already in the run folder
    generation_errors: int = 0
    judge: Optional[str] = None
    judged: int = 0
    judge_errors: int = 0
    unparsed: int = 0
    structured_fallbacks: int = 0  # judgments where structured output was asked for and not honoured
    leakage_judged: int = 0
    leakage_views: tuple[str, ...] = ()  # "text" and, with a judge that sees images, "pair"
    ecso_flagged: int = 0  # samples whose ECSO self-judge said unsafe (this invocation)
    first_judge_error: str = ""
    seconds: float = 0.0
    repaired_bytes: int = 0  # a torn last line cut off (after a kill)
    notes: list[str] = field(default_factory=list)


def generation_identity(cfg: EvalConfig) -> dict:
    """What must not change within one run: the model files and everything that shapes an answer."""
    from ecso.runtime.images import file_fingerprint

    e = cfg.engine
    if cfg.backend is not None:
        return {**_remote_model_identity(cfg.backend), **_decoding_identity(cfg)}
    if not Path(e.model).is_file():
        raise InputError(f"model file {e.model} not found")
    if e.mmproj and not Path(e.mmproj).is_file():
        raise InputError(f"mmproj file {e.mmproj} not found")
    return {"model": str(e.model), "model_fingerprint": file_fingerprint(e.model), "mmproj": e.mmproj,
            "mmproj_fingerprint": file_fingerprint(e.mmproj) if e.mmproj else None, "chat_format": e.chat_format,
            **_decoding_identity(cfg)}


def _remote_model_identity(backend: RemoteConfig) -> dict:
    """A server's model is known by its name; its URL may change between runs (a restarted server, another port)."""
    return {"model": backend.url, "model_fingerprint": f"remote:{backend.model}", "mmproj": None,
            "mmproj_fingerprint": None, "chat_format": "server"}


def _decoding_identity(cfg: EvalConfig) -> dict:
    o = cfg.options
    return {"prompt_version": PROMPT_VERSION, "decision_rule": o.decision_rule, "self_judge": o.judge,
            "logit_threshold": o.logit_threshold, "max_tokens": o.max_tokens,
            "caption_max_tokens": o.caption_max_tokens, "judge_max_tokens": o.judge_max_tokens,
            "temperature": o.temperature, "top_p": o.top_p, "seed": o.seed, "system_prompt": o.system_prompt,
            "query_suffix": cfg.query_suffix or None, "regenerate_with_image": cfg.regenerate_with_image}


_IDENTITY_IGNORED = ("model", "mmproj")  # paths (and server URLs) may move; the fingerprints decide
_IDENTITY_DEFAULTS = {"regenerate_with_image": False}  # keys newer than some run folders: their value there


def check_resumable(previous: Optional[dict], benchmark: str, identity: dict, force: bool) -> list[str]:
    """Raises when the run folder holds another benchmark, or (unless forced) answers from other settings."""
    if previous is None:
        return []
    if previous.get("benchmark") != benchmark:
        raise InputError(f"this run folder holds {previous.get('benchmark')!r}, not {benchmark!r}; use another --out")
    old = previous.get("generation", {})
    diffs = [f"{k}: {old.get(k, _IDENTITY_DEFAULTS.get(k))!r} -> {v!r}" for k, v in identity.items()
             if k not in _IDENTITY_IGNORED and old.get(k, _IDENTITY_DEFAULTS.get(k)) != v]
    if diffs and not force:
        raise InputError("this run folder was made with other settings (" + "; ".join(diffs) +
                         "); use a new --out, or --force to add answers from the new settings to it")
    return [f"--force: continuing with changed settings ({'; '.join(diffs)})"] if diffs else []


def answer_sha(answer: str) -> str:
    return hashlib.sha256(answer.encode("utf-8")).hexdigest()[:16]
