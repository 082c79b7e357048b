"""`ecso eval`: generate (with and/or without ECSO), judge and measure leakage, resumably, into a run folder.

Three passes, each skipping what the run folder already holds (see store.py for the files):
1. generate (generation.py): one ECSO request per sample; with both defenses, the undefended answer is ECSO's
   step 1, recorded as its own "none" record: one model pass serves both columns.
2. judge: every generated answer without a judgment by the current judge (failed calls are retried next time).
3. leakage (--leakage): the judge reads each text query alone and, when it sees images, each image + text pair
   (see leakage.py for what is measured and how it is defined).
Utility benchmarks (MME, benign sets) skip pass 2: they are scored by rule in the report.
A preset (presets.py) fixes the published settings and is recorded in run.json, and so is every judge that read the
run (`judge_details`: where it runs, the host of its base URL, the model asked for).
A run refuses to continue with another model, prompt version or decoding settings unless forced; the judge may
change freely (that is re-judging).
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from ecso.eval import store
from ecso.eval.benchmarks import UTILITY_BENCHMARKS, load_benchmark
from ecso.eval.generation import generate_all, progress_bar
from ecso.eval.judge_prompts import JUDGE_PROMPTS_VERSION, LEAKAGE_PROMPT_VERSION, PAIR_PROMPT_VERSION
from ecso.eval.judges import GuardJudge, JudgeInput, LocalLLMJudge, OpenAIJudge, RuleJudge
from ecso.eval.run_config import (DEFENSES, RUN_FORMAT, EvalConfig, EvalSummary, JudgeSpec,  # noqa: F401
                                  answer_sha, check_resumable, generation_identity)
from ecso.eval.samples import Sample
from ecso.runtime import EngineConfig, InputError


def open_eval_model(config: EngineConfig):
    """The model under evaluation: the one place where the runner constructs it (an in-process Engine)."""
    from ecso.runtime import Engine

    return Engine(config)


def remote_model(backend):
    """The model under evaluation behind an OpenAI-compatible server (`--backend`)."""
    from ecso.runtime.remote import RemoteModel

    return RemoteModel(backend)


class _Engines:
    """Loads engines lazily and shares one per model file (a text judge on the eval model reuses its engine)."""

    def __init__(self, eval_config: EngineConfig):
        self.eval_config = eval_config
        self.loaded: dict[str, object] = {}

    def eval_engine(self):
        key = self._key(self.eval_config)
        if key not in self.loaded:
            self.loaded[key] = open_eval_model(self.eval_config)
        return self.loaded[key]

    def judge_engine(self, config: EngineConfig):
        """An engine for a local judge: the eval engine when it is the same model (and projector, if the judge has
        one), else a new one, after freeing the eval engine (generation is over; two big models need not share
        the memory)."""
        same_model = str(Path(config.model).resolve()) == str(Path(self.eval_config.model).resolve())
        if same_model and (config.mmproj is None or config.mmproj == self.eval_config.mmproj):
            return self.eval_engine()
        self.close()
        from ecso.runtime import Engine

        self.loaded[self._key(config)] = Engine(config)
        return self.loaded[self._key(config)]

    @staticmethod
    def _key(config: EngineConfig) -> str:
        return f"{Path(config.model).resolve()}|{config.mmproj}"

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
    if cfg.regenerate_with_image and cfg.engine.parallel > 1:
        raise InputError("step 4 with the image runs one request at a time; drop --parallel")
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
            get_model = (lambda: remote_model(cfg.backend)) if cfg.backend is not None else engines.eval_engine
            generate_all(cfg, samples, responses, identity, get_model, summary)
            utility = bench in UTILITY_BENCHMARKS
            judge = None if utility else make_judge(cfg.judge, engines)
            if utility and cfg.judge.kind != "rule":
                summary.notes.append(f"{bench} is scored by rule in the report; --judge is not used")
            if judge is not None:
                summary.judge = judge.id
                run_info["judge"] = judge.id
                run_info["judges"] = sorted(set(run_info.get("judges", [])) | {judge.id})
                run_info["judge_details"] = {**run_info.get("judge_details", {}), judge.id: judge.describe()}
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
                                             "no pair harm rate or leak share (use --judge llm with a vision GGUF, "
                                             "or openai:URL)")
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
    if summary.structured_fallbacks:
        summary.notes.append(f"structured output was not honoured in {summary.structured_fallbacks} judgments "
                             "(recorded per judgment): this run is not judged as the paper's judge did")
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
        bar = progress_bar(cfg, len(todo), 0, f"{summary.benchmark}: judge ({judge.id})")
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
                summary.structured_fallbacks += j.structured == "fallback"
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
        bar = progress_bar(cfg, len(todo), 0, f"{summary.benchmark}: leakage ({judge.id})")
        try:
            summary.leakage_judged += judge_leakage(todo, judge, log, views, on_done=lambda: bar.update(1))
        finally:
            bar.close()
    finally:
        log.close()


def summary_dict(s: EvalSummary) -> dict:
    return asdict(s)
