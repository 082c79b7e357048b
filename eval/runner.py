"""`ecso eval`: generate (with and/or without ECSO), judge and measure leakage, resumably, into a run folder.

Three passes, each skipping what the run folder already holds (see store.py for the files):
1. generate: one ECSO request per sample; with both defenses, the undefended answer is ECSO's step 1 (the same
   greedy call with the same seed), recorded as its own "none" record: one model pass serves both columns.
2. judge: every generated answer without a judgment by the current judge (failed calls are retried next time).
3. leakage (--leakage): the judge reads each text query alone and, when it sees images, each image + text pair
   (VLSBench's R1 / R2; see leakage.py).
Utility benchmarks (MME, benign sets) skip pass 2: they are scored by rule in the report.
A preset (presets.py) fixes the published settings and is recorded in run.json.
A run refuses to continue with another model, prompt version or decoding settings unless forced; the judge may
change freely (that is re-judging).
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from ecso.eval import store
from ecso.eval.benchmarks import UTILITY_BENCHMARKS, Sample, load_benchmark
from ecso.eval.judge_prompts import JUDGE_PROMPTS_VERSION, LEAKAGE_PROMPT_VERSION, PAIR_PROMPT_VERSION
from ecso.eval.judges import GuardJudge, JudgeInput, LocalLLMJudge, OpenAIJudge, RuleJudge
from ecso.runtime import EcsoError, EcsoOptions, EngineConfig, InputError, PROMPT_VERSION, RemoteConfig

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
            from ecso.eval.judges import chat_endpoint

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
    system_prompt: Optional[str] = None  # sent as the first message of step 1 (a preset's conversation template)
    query_suffix: str = ""  # appended to every query (MME: LLaVA's short-answer line)
    preset: Optional[dict] = None  # presets.Preset.record(), kept in run.json
    force: bool = False
    retry_errors: bool = False
    progress: bool = True
    backend: Optional["RemoteConfig"] = None  # generation on an OpenAI-compatible server (then `engine` only judges)


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


def _decoding_identity(cfg: EvalConfig) -> dict:
    o = cfg.options
    return {"prompt_version": PROMPT_VERSION, "decision_rule": o.decision_rule, "self_judge": o.judge,
            "logit_threshold": o.logit_threshold, "max_tokens": o.max_tokens,
            "caption_max_tokens": o.caption_max_tokens, "judge_max_tokens": o.judge_max_tokens,
            "temperature": o.temperature, "top_p": o.top_p, "seed": o.seed, "system_prompt": cfg.system_prompt,
            "query_suffix": cfg.query_suffix or None}


def _remote_model_identity(backend: RemoteConfig) -> dict:
    """A server's model is known by its name; its URL may change between runs (a restarted server, another port)."""
    return {"model": backend.url, "model_fingerprint": f"remote:{backend.model}", "mmproj": None,
            "mmproj_fingerprint": None, "chat_format": "server"}


_IDENTITY_IGNORED = ("model", "mmproj")  # paths (and server URLs) may move; the fingerprints decide


def check_resumable(previous: Optional[dict], benchmark: str, identity: dict, force: bool) -> list[str]:
    """Raises when the run folder holds another benchmark, or (unless forced) answers from other settings."""
    if previous is None:
        return []
    if previous.get("benchmark") != benchmark:
        raise InputError(f"this run folder holds {previous.get('benchmark')!r}, not {benchmark!r}; use another --out")
    old = previous.get("generation", {})
    diffs = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in identity.items()
             if k not in _IDENTITY_IGNORED and old.get(k) != v]
    if diffs and not force:
        raise InputError("this run folder was made with other settings (" + "; ".join(diffs) +
                         "); use a new --out, or --force to add answers from the new settings to it")
    return [f"--force: continuing with changed settings ({'; '.join(diffs)})"] if diffs else []


class _Engines:
    """Loads engines lazily and shares one per model file (a text judge on the eval model reuses its engine)."""

    def __init__(self, eval_config: EngineConfig):
        self.eval_config = eval_config
        self.loaded: dict[str, object] = {}

    def eval_engine(self):
        return self._get(self.eval_config)

    def judge_engine(self, config: EngineConfig):
        """An engine for a local judge: the eval engine when it is the same model (and projector, if the judge has
        one), else a new one, after freeing the eval engine (generation is over; two big models need not share
        the memory)."""
        same_model = str(Path(config.model).resolve()) == str(Path(self.eval_config.model).resolve())
        if same_model and (config.mmproj is None or config.mmproj == self.eval_config.mmproj):
            return self._get(self.eval_config)
        self.close()
        return self._get(config)

    def _get(self, config: EngineConfig):
        from ecso.runtime import Engine

        key = f"{Path(config.model).resolve()}|{config.mmproj}"
        if key not in self.loaded:
            self.loaded[key] = Engine(config)
        return self.loaded[key]

    def close(self) -> None:
        for e in self.loaded.values():
            e.close()
        self.loaded.clear()


def make_judge(spec: JudgeSpec, engines: _Engines):
    """The judge object for a spec (None for --judge none)."""
    if spec.kind == "none":
        return None
    if spec.kind == "rule":
        return RuleJudge()
    if spec.url is not None:  # openai:URL, guard:URL
        transport = OpenAIJudge(spec.url, spec.model or "", spec.max_tokens, spec.prompt_set,
                                spec.send_images and spec.kind == "openai", retries=spec.retries,
                                retry_wait=spec.retry_wait)
        return GuardJudge(transport) if spec.kind == "guard" else transport
    base = engines.eval_config
    model, mmproj = spec.local_files()
    if spec.kind == "guard":
        mmproj = None  # Llama Guard 3 reads text
    config = EngineConfig(model=model, mmproj=mmproj, n_ctx=spec.n_ctx, n_threads=base.n_threads,
                          n_gpu_layers=base.n_gpu_layers, flash_attn=base.flash_attn, verbose=base.verbose,
                          cpu_repack=base.cpu_repack)
    local = LocalLLMJudge(engines.judge_engine(config), spec.max_tokens, spec.prompt_set,
                          sees_images=bool(mmproj) and spec.send_images)
    return GuardJudge(local) if spec.kind == "guard" else local


def run_eval(cfg: EvalConfig) -> EvalSummary:
    """Runs (or resumes) an evaluation into cfg.out; see the module docstring."""
    t0 = time.perf_counter()
    bad = [d for d in cfg.defenses if d not in DEFENSES]
    if bad or not cfg.defenses:
        raise InputError(f"unknown defense {', '.join(bad) or '(none given)'}; use none, ecso or both")
    cfg.options.validate()
    cfg.judge.validate()
    samples = load_benchmark(cfg.benchmark, cfg.data, cfg.categories, cfg.modes, cfg.limit, cfg.images)
    if not samples:
        raise InputError("the selection is empty: check --category/--scenario/--mode/--limit")
    bench = samples[0].benchmark
    run_dir = Path(cfg.out).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = EvalSummary(str(run_dir), bench, n_samples=len(samples),
                          n_input_errors=sum(1 for s in samples if s.error))
    identity = generation_identity(cfg)
    engines = _Engines(cfg.engine)
    with store.RunLock(run_dir):
        previous = store.read_json(run_dir / store.RUN_FILE)
        summary.notes += check_resumable(previous, bench, identity, cfg.force)
        store.write_jsonl_atomic(run_dir / store.SAMPLES_FILE, (s.to_dict() for s in samples))
        run_info = _run_info(cfg, bench, identity, previous)
        store.write_json_atomic(run_dir / store.RUN_FILE, run_info)
        responses = store.JsonlLog(run_dir / store.RESPONSES_FILE)
        try:
            summary.repaired_bytes += responses.repaired_bytes
            _generate(cfg, samples, responses, identity, engines, summary)
            utility = bench in UTILITY_BENCHMARKS
            judge = None if utility else make_judge(cfg.judge, engines)
            if utility and cfg.judge.kind != "rule":
                summary.notes.append(f"{bench} is scored by rule in the report; --judge is not used")
            if judge is not None:
                summary.judge = judge.id
                run_info["judge"] = judge.id
                run_info["judges"] = sorted(set(run_info.get("judges", [])) | {judge.id})
                store.write_json_atomic(run_dir / store.RUN_FILE, run_info)
                _judge_all(cfg, samples, responses, judge, run_dir, summary)
                if cfg.leakage:
                    views = ("text", "pair") if judge.sees_images else ("text",)
                    run_info["leakage_judge"] = judge.id
                    run_info["leakage_views"] = list(views)
                    store.write_json_atomic(run_dir / store.RUN_FILE, run_info)
                    _leakage_all(cfg, samples, judge, views, run_dir, summary)
                    if not judge.sees_images:
                        summary.notes.append(f"judge {judge.id} does not see images: text-alone harm rate only, "
                                             "no R1 / R2 (use --judge llm with a vision GGUF, or openai:URL)")
                judge.close()
            elif cfg.leakage:
                summary.notes.append("--leakage needs a judge; skipped" + (" for utility benchmarks" if utility
                                                                            else " with --judge none"))
        finally:
            responses.close()
            engines.close()
    if summary.judge_errors:
        summary.notes.append(f"{summary.judge_errors} judge calls failed and count as unknown (first: "
                             f"{summary.first_judge_error}); run again to retry them")
    if summary.repaired_bytes:
        summary.notes.append(f"cut a torn last line ({summary.repaired_bytes} bytes) left by an interrupted run")
    summary.seconds = time.perf_counter() - t0
    return summary


def _run_info(cfg: EvalConfig, bench: str, identity: dict, previous: Optional[dict]) -> dict:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    info = dict(previous or {})
    info.update({
        "format": RUN_FORMAT, "benchmark": bench, "data": str(Path(cfg.data).resolve()),
        "selection": {"categories": list(cfg.categories), "modes": list(cfg.modes), "limit": cfg.limit,
                      "images": cfg.images},
        "defenses": sorted(set(info.get("defenses", [])) | set(cfg.defenses), key=DEFENSES.index),
        "generation": identity if previous is None or cfg.force else info.get("generation", identity),
        "judge_prompts_version": JUDGE_PROMPTS_VERSION, "leakage_prompt_version": LEAKAGE_PROMPT_VERSION,
        "pair_prompt_version": PAIR_PROMPT_VERSION, "preset": cfg.preset,
        "created": info.get("created", now), "updated": now,
    })
    info["defenses_last_run"] = list(cfg.defenses)
    return info


# --- pass 1: generation -----------------------------------------------------------------------------------------
def _generate(cfg: EvalConfig, samples: list[Sample], log: store.JsonlLog, identity: dict, engines: _Engines,
              summary: EvalSummary) -> None:
    def missing(s: Sample) -> list[str]:
        out = []
        for d in cfg.defenses:
            rec = log.records.get(f"{s.id}|{d}")
            stale_input_error = rec is not None and rec["status"] == "input_error" and rec["error"] != s.error
            if rec is None or stale_input_error or (cfg.retry_errors and rec["status"] != "ok"):
                out.append(d)  # stale: the image was added (or the row fixed) since the last run
        return out

    todo = [(s, m) for s in samples for m in [missing(s)] if m]
    summary.reused = len(samples) * len(cfg.defenses) - sum(len(m) for _, m in todo)
    if not todo:
        return
    bar = _bar(cfg, len(samples), len(samples) - len(todo), f"{summary.benchmark}: generate")
    try:
        runnable = []
        for sample, defenses in todo:
            if sample.error:
                for d in defenses:
                    log.append(_record(sample, d, identity, "input_error", error=sample.error))
                    summary.generated += 1
                bar.update(1)
            else:
                runnable.append((sample, defenses))
        # each finished request is written (one fsync'd record at a time) before the next result is taken
        target = _remote_model(cfg.backend) if cfg.backend is not None else engines.eval_engine()
        for (sample, defenses), outcome in _outcomes(cfg, runnable, target):
            _write_outcome(sample, defenses, outcome, log, identity, summary)
            bar.update(1)
    finally:
        bar.close()


def _options(cfg: EvalConfig, defenses: list[str]):
    return replace(cfg.options, defense="ecso" in defenses, guard_every=0)


def _history(cfg: EvalConfig) -> list:
    from ecso.runtime import Message

    return [Message("system", cfg.system_prompt)] if cfg.system_prompt else []


def _outcomes(cfg: EvalConfig, todo: list, engine):
    """(item, Result or EcsoError) per item: one at a time, or `--parallel N` requests decoded together (in
    completion order; records are keyed, so the order in the file does not matter)."""
    from ecso.runtime import run

    history = _history(cfg)
    if cfg.backend is not None:
        yield from _remote_outcomes(cfg, todo, engine, history)
        return
    if engine.config.parallel > 1:
        from ecso.runtime.batch import Request, run_batched

        reqs = [Request(s.image, s.query + cfg.query_suffix, _options(cfg, d), history) for s, d in todo]
        with contextlib.closing(run_batched(engine, reqs, cfg.options, None)) as outcomes:
            for i, outcome in outcomes:
                if not isinstance(outcome, EcsoError) and isinstance(outcome, BaseException):
                    raise outcome
                yield todo[i], outcome
        return
    for sample, defenses in todo:
        try:
            yield (sample, defenses), run(engine, sample.image, sample.query + cfg.query_suffix,
                                          _options(cfg, defenses), history=history)
        except EcsoError as e:
            yield (sample, defenses), e


def _remote_model(backend: RemoteConfig):
    from ecso.runtime.remote import RemoteModel

    return RemoteModel(backend)


def _remote_outcomes(cfg: EvalConfig, todo: list, model, history: list):
    """(item, Result or EcsoError) with `backend.parallel` requests in flight on the server, in completion order.
    Only this thread writes records; a request that fails after its retries (server down) is recorded as an
    error and generated again by `--retry-errors`; requests in flight when the run is killed were never written."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from ecso.runtime import run

    def one(sample, defenses):
        try:
            return run(model, sample.image, sample.query + cfg.query_suffix, _options(cfg, defenses),
                       history=history)
        except EcsoError as e:
            return e

    items = iter(todo)
    with ThreadPoolExecutor(max_workers=cfg.backend.parallel, thread_name_prefix="ecso-eval") as pool:
        running = {}
        try:
            for item in items:
                running[pool.submit(one, *item)] = item
                if len(running) >= cfg.backend.parallel:
                    break
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    item = running.pop(future)
                    next_item = next(items, None)
                    if next_item is not None:
                        running[pool.submit(one, *next_item)] = next_item
                    yield item, future.result()
        finally:
            for future in running:
                future.cancel()


def _write_outcome(sample: Sample, defenses: list[str], result, log: store.JsonlLog, identity: dict,
                   summary: EvalSummary) -> None:
    if isinstance(result, EcsoError):  # a corrupt image, a prompt over the context: recorded, counted, the run goes on
        e = result
        for d in defenses:
            log.append(_record(sample, d, identity, "error", error=f"{type(e).__name__}: {e}"))
            summary.generated += 1
            summary.generation_errors += 1
        return
    trace = result.to_dict()
    if "ecso" in defenses:
        summary.ecso_flagged += int(result.unsafe)
        log.append(_record(sample, "ecso", identity, "ok", answer=result.answer, flagged=result.unsafe, trace=trace,
                           seconds=result.seconds))
        summary.generated += 1
    if "none" in defenses:
        if "ecso" in defenses:  # the undefended answer is ECSO's step 1: same call, same seed
            first = trace["steps"][0]
            none_trace = {"derived_from": f"{sample.id}|ecso", "steps": [first], "engine": trace["engine"],
                          "options": {**trace["options"], "defense": False}, "prompt_version": result.prompt_version}
            log.append(_record(sample, "none", identity, "ok", answer=result.initial_answer, trace=none_trace,
                               seconds=first["seconds"]))
        else:
            log.append(_record(sample, "none", identity, "ok", answer=result.answer, trace=trace,
                               seconds=result.seconds))
        summary.generated += 1


def _record(sample: Sample, defense: str, identity: dict, status: str, answer: Optional[str] = None,
            flagged: Optional[bool] = None, trace: Optional[dict] = None, error: Optional[str] = None,
            seconds: Optional[float] = None) -> dict:
    return {
        "key": f"{sample.id}|{defense}", "sample_id": sample.id, "defense": defense, "benchmark": sample.benchmark,
        "category": sample.category, "mode": sample.mode, "status": status, "error": error, "answer": answer,
        "ecso_flagged": flagged, "model_fingerprint": identity["model_fingerprint"],
        "mmproj_fingerprint": identity["mmproj_fingerprint"], "prompt_version": identity["prompt_version"],
        "decision_rule": identity["decision_rule"], "self_judge": identity["self_judge"], "seed": identity["seed"],
        "temperature": identity["temperature"], "top_p": identity["top_p"], "max_tokens": identity["max_tokens"],
        "seconds": seconds, "trace": trace, "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def answer_sha(answer: str) -> str:
    return hashlib.sha256(answer.encode("utf-8")).hexdigest()[:16]


# --- pass 2: judging --------------------------------------------------------------------------------------------
def _judge_all(cfg: EvalConfig, samples: list[Sample], responses: store.JsonlLog, judge, run_dir: Path,
               summary: EvalSummary) -> None:
    log = store.JsonlLog(run_dir / store.JUDGMENTS_FILE)
    summary.repaired_bytes += log.repaired_bytes
    try:
        todo = []
        for s in samples:
            for d in cfg.defenses:
                resp = responses.records.get(f"{s.id}|{d}")
                if resp is None or resp["status"] != "ok":
                    continue
                prev = log.records.get(f"{s.id}|{d}|{judge.id}")
                if prev and prev["parse"] != "error" and prev.get("response_sha") == answer_sha(resp["answer"]):
                    continue
                todo.append((s, d, resp))
        if not todo:
            return
        bar = _bar(cfg, len(todo), 0, f"{summary.benchmark}: judge ({judge.id})")
        try:
            for s, d, resp in todo:
                item = JudgeInput(s.benchmark, s.category, s.query, resp["answer"], s.image,
                                  s.extra.get("image_description"))
                j = judge.judge(item)
                log.append({"key": f"{s.id}|{d}|{judge.id}", "response_key": resp["key"], "sample_id": s.id,
                            "defense": d, "response_sha": answer_sha(resp["answer"]),
                            "judge_prompts_version": JUDGE_PROMPTS_VERSION, **j.to_dict(),
                            "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
                summary.judged += 1
                summary.judge_errors += j.parse == "error"
                if j.parse == "error" and not summary.first_judge_error:
                    summary.first_judge_error = j.error
                summary.unparsed += j.parse == "unparsed"
                bar.update(1)
        finally:
            bar.close()
    finally:
        log.close()


# --- pass 3: leakage --------------------------------------------------------------------------------------------
def _leakage_all(cfg: EvalConfig, samples: list[Sample], judge, views: tuple[str, ...], run_dir: Path,
                 summary: EvalSummary) -> None:
    from ecso.eval.leakage import judge_leakage, record_key

    summary.leakage_views = views
    log = store.JsonlLog(run_dir / store.LEAKAGE_FILE)
    summary.repaired_bytes += log.repaired_bytes
    try:
        def pending(s: Sample) -> bool:
            return any((log.records.get(record_key(s.id, judge.id, v)) or {}).get("parse", "error") == "error"
                       for v in views if v == "text" or (s.image and not s.error))

        todo = [s if not s.error else replace(s, image=None) for s in samples  # unusable image: text view only
                if s.query.strip() and pending(s)]
        if not todo:
            return
        bar = _bar(cfg, len(todo), 0, f"{summary.benchmark}: leakage ({judge.id})")
        try:
            summary.leakage_judged += judge_leakage(todo, judge, log, views, on_done=lambda: bar.update(1))
        finally:
            bar.close()
    finally:
        log.close()


def _bar(cfg: EvalConfig, total: int, initial: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="sample", file=sys.stderr, disable=not cfg.progress,
                dynamic_ncols=True, smoothing=0.1)


def summary_dict(s: EvalSummary) -> dict:
    return asdict(s)
