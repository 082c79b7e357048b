"""ECSO as a data engine: for every sample ECSO flags unsafe, an SFT record with ECSO's safe (eyes-closed) answer.

The records use LLaVA's conversation format, so they drop into LLaVA-style fine-tuning as they are:

    {"id": ..., "image": "path.jpg", "conversations": [{"from": "human", "value": "<image>\\nQUERY"},
                                                      {"from": "gpt", "value": "ECSO's safe answer"}],
     "ecso_trace": {... every step: the unsafe first answer, the self-judge's reply, the caption ...}}

Text-only samples get no "image" key and no "<image>" line. Extra keys are ignored by LLaVA's loader and keep the
provenance (model fingerprint, prompt version, decision rule, seed) for audit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ecso.eval import store
from ecso.eval.verdicts import SAFE_LABELS
from ecso.eval.runner import answer_sha
from ecso.runtime.errors import InputError

IMAGE_TOKEN = "<image>"


@dataclass
class DataEngineSummary:
    out: str
    run_dir: str
    n_samples: int = 0
    n_generated: int = 0  # samples with an ECSO answer in the run
    n_flagged: int = 0  # ... that ECSO's self-judge flagged unsafe
    n_written: int = 0
    n_skipped_empty: int = 0  # flagged, but the safe answer came out empty
    n_skipped_judge: int = 0  # flagged, but --only-judged-safe and the judge did not call the safe answer safe


def sft_record(sample: dict, response: dict, image_root: Optional[str | Path] = None,
               judgment: Optional[dict] = None) -> dict:
    """One LLaVA conversation record from a sample and its ECSO response."""
    query = sample["query"]
    rec: dict = {"id": sample["id"]}
    if sample.get("image"):
        image = sample["image"]
        rec["image"] = os.path.relpath(image, image_root) if image_root else image
        human = f"{IMAGE_TOKEN}\n{query}"
    else:
        human = query
    rec["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": response["answer"]}]
    trace = response.get("trace") or {}
    rec["ecso_trace"] = {
        "benchmark": sample["benchmark"], "category": sample["category"], "mode": sample["mode"],
        "unsafe_answer": trace.get("initial_answer"), "self_judge": response.get("self_judge"),
        "self_judge_reply": trace.get("judge_reply"), "self_judge_score": trace.get("judge_score"),
        "caption": trace.get("caption"), "model_fingerprint": response.get("model_fingerprint"),
        "mmproj_fingerprint": response.get("mmproj_fingerprint"), "prompt_version": response.get("prompt_version"),
        "decision_rule": response.get("decision_rule"), "seed": response.get("seed"),
        "temperature": response.get("temperature"), "steps": trace.get("steps", []),
    }
    if judgment is not None:
        rec["ecso_trace"]["judgment"] = {k: judgment.get(k) for k in ("judge", "label", "score", "parse", "raw")}
    return rec


def export_sft(run_dir: str | Path, out: str | Path, image_root: Optional[str | Path] = None,
               only_judged_safe: bool = False, judge: Optional[str] = None) -> DataEngineSummary:
    """Writes the SFT JSONL (atomically) from a run folder's ECSO answers."""
    run_dir = Path(run_dir)
    run = store.read_json(run_dir / store.RUN_FILE)
    if run is None:
        raise InputError(f"{run_dir} has no {store.RUN_FILE}: run `ecso eval` or `ecso data-engine` first")
    judge_id = judge or run.get("judge")
    if only_judged_safe and not judge_id:
        raise InputError("--only-judged-safe needs a judged run (use --judge rule|llm|openai:URL)")
    samples = store.read_samples(run_dir)
    responses = store.read_log(run_dir / store.RESPONSES_FILE).records
    judgments = store.read_log(run_dir / store.JUDGMENTS_FILE).records
    summary = DataEngineSummary(str(out), str(run_dir), n_samples=len(samples))
    rows = []
    for s in samples:
        r = responses.get(f"{s['id']}|ecso")
        if r is None or r["status"] != "ok":
            continue
        summary.n_generated += 1
        if not r.get("ecso_flagged"):
            continue
        summary.n_flagged += 1
        if not (r.get("answer") or "").strip():
            summary.n_skipped_empty += 1
            continue
        j = judgments.get(f"{s['id']}|ecso|{judge_id}") if judge_id else None
        if j is not None and j.get("response_sha") != answer_sha(r["answer"]):
            j = None
        if only_judged_safe and not (j and j.get("parse") == "ok" and j.get("label") in SAFE_LABELS):
            summary.n_skipped_judge += 1
            continue
        rows.append(sft_record(s, r, image_root, j))
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    store.write_jsonl_atomic(out_path, rows)
    summary.n_written = len(rows)
    return summary
