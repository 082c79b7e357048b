"""Pass 1 of `ecso eval`: one ECSO request per sample; with both defenses, the undefended answer is ECSO's step 1
(the same greedy call with the same seed), recorded as its own "none" record: one model pass serves both columns.
Each finished request is written (one fsync'd record) before the next result is taken, so a killed run resumes.

`regenerate_with_image` (ECSO's released MME / MM-Vet script, used by the MME preset): when ECSO flags an answer,
step 4's GEN prompt is answered once more, in the same conversation template, *with* the image; that answer is the
final one, and the eyes-closed step 4 stays in the trace.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from typing import Callable, Optional

from ecso.eval import store
from ecso.eval.run_config import EvalConfig, EvalSummary
from ecso.eval.samples import Sample
from ecso.runtime import EcsoError


def generate_all(cfg: EvalConfig, samples: list[Sample], log: store.JsonlLog, identity: dict,
                 get_engine: Callable[[], object], summary: EvalSummary) -> None:
    """Pass 1: an answer record per sample and defense that the run folder does not hold yet (the model is
    loaded by `get_engine` only when there is something to generate)."""
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
    bar = progress_bar(cfg, len(samples), len(samples) - len(todo), f"{summary.benchmark}: generate")
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
        engine = get_engine() if runnable else None
        # each finished request is written (one fsync'd record at a time) before the next result is taken
        for (sample, defenses), outcome in _outcomes(cfg, runnable, engine):
            with_image = None
            if cfg.regenerate_with_image and "ecso" in defenses and not isinstance(outcome, EcsoError) \
                    and outcome.unsafe:
                try:
                    with_image = regenerate_with_image(engine, cfg, sample, outcome)
                except EcsoError as e:  # only the ECSO record fails; the undefended answer stands
                    with_image = {"name": "regenerate_with_image", "error": f"{type(e).__name__}: {e}"}
            _write_outcome(sample, defenses, outcome, log, identity, summary, with_image)
            bar.update(1)
    finally:
        bar.close()


def _options(cfg: EvalConfig, defenses: list[str]):
    return replace(cfg.options, defense="ecso" in defenses, guard_every=0)


def _outcomes(cfg: EvalConfig, todo: list, engine):
    """(item, Result or EcsoError) per item: one at a time, or `--parallel N` requests decoded together (in
    completion order; records are keyed, so the order in the file does not matter)."""
    from ecso.runtime import run

    if cfg.backend is not None:
        yield from _remote_outcomes(cfg, todo, engine)
        return
    if engine.config.parallel > 1:
        from ecso.runtime.batch import Request, run_batched

        reqs = [Request(s.image, s.query + cfg.query_suffix, _options(cfg, d)) for s, d in todo]
        with contextlib.closing(run_batched(engine, reqs, cfg.options, None)) as outcomes:
            for i, outcome in outcomes:
                if not isinstance(outcome, EcsoError) and isinstance(outcome, BaseException):
                    raise outcome
                yield todo[i], outcome
        return
    for sample, defenses in todo:
        try:
            yield (sample, defenses), run(engine, sample.image, sample.query + cfg.query_suffix,
                                          _options(cfg, defenses))
        except EcsoError as e:
            yield (sample, defenses), e


def _remote_outcomes(cfg: EvalConfig, todo: list, model):
    """(item, Result or EcsoError) with `backend.parallel` requests in flight on the server, in completion order.
    Only this thread writes records; a request that fails after its retries (server down) is recorded as an
    error and generated again by `--retry-errors`; requests in flight when the run is killed were never written."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from ecso.runtime import run

    def one(sample, defenses):
        try:
            return run(model, sample.image, sample.query + cfg.query_suffix, _options(cfg, defenses))
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
                   summary: EvalSummary, with_image: Optional[dict] = None) -> None:
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
        answer, seconds = result.answer, result.seconds
        if with_image is not None:  # ECSO's released utility script: step 4 again, with the image
            trace = {**trace, "steps": trace["steps"] + [with_image], "eyes_closed_answer": result.answer}
            answer, seconds = (with_image.get("text") or "").strip(), seconds + with_image.get("seconds", 0.0)
        if with_image is not None and "error" in with_image:
            log.append(_record(sample, "ecso", identity, "error", error=with_image["error"], trace=trace))
            summary.generation_errors += 1
        else:
            log.append(_record(sample, "ecso", identity, "ok", answer=answer, flagged=result.unsafe, trace=trace,
                               seconds=seconds))
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


def regenerate_with_image(engine, cfg: EvalConfig, sample: Sample, result) -> dict:
    """Step 4 as ECSO's released utility script runs it: GEN(caption, query) with the image, same system prompt,
    same decoding settings and token limit as ecso's own step 4. Returns the step for the trace; its text is the
    final answer."""
    from ecso.runtime import Message, Sampling
    from ecso.runtime.prompts import gen_prompt

    o = cfg.options
    query = engine.clean_user_text(sample.query + cfg.query_suffix)
    text = gen_prompt(engine.clean_user_text(result.caption or ""), query)
    msgs = ([Message("system", engine.clean_user_text(o.system_prompt))] if o.system_prompt is not None else []) + \
        [Message("user", text)]
    t0 = time.perf_counter()
    gen = engine.chat(msgs, image=sample.image, sampling=Sampling(o.temperature, o.top_p, o.seed, o.max_tokens))
    return {"name": "regenerate_with_image", "generated_tokens": len(gen.tokens), "finish_reason": gen.finish_reason,
            "text": gen.text, "seconds": time.perf_counter() - t0, "path": "llm"}


def progress_bar(cfg: EvalConfig, total: int, initial: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="sample", file=sys.stderr, disable=not cfg.progress,
                dynamic_ncols=True, smoothing=0.1)
