"""Eval run folders written record by record (run.json, samples.jsonl, responses.jsonl, judgments.jsonl,
leakage.jsonl), no model needed: the report, label and utility tests recompute their numbers by hand on them."""

from __future__ import annotations

from pathlib import Path

from ecso.eval import store
from ecso.eval.mme import load_mme
from ecso.eval.runner import answer_sha
from support.benchmark_files import write_mme

JUDGE = "openai:gpt-4o@judge"


def sample_record(sid, bench, category, mode="image", error=None):
    """One samples.jsonl record (query and image named after the id)."""
    return {"id": sid, "benchmark": bench, "category": category, "query": f"query {sid}?", "image": f"/imgs/{sid}.png",
            "mode": mode, "subcategory": None, "extra": {}, "error": error}


def response_record(sid, defense, status="ok", flagged=False, answer=None):
    """One responses.jsonl record, with the ECSO trace of a flagged (four steps) or unflagged (two) answer."""
    answer = answer if answer is not None else f"answer {sid} {defense}"
    trace = {"initial_answer": f"unsafe first answer {sid}", "judge_reply": "yes" if flagged else "no",
             "judge_score": None, "caption": f"caption {sid}" if flagged else None,
             "steps": [{"name": n} for n in (("answer", "judge", "caption", "regenerate") if flagged else
                                             ("answer", "judge"))]}
    return {"key": f"{sid}|{defense}", "sample_id": sid, "defense": defense, "status": status,
            "answer": answer if status == "ok" else None, "ecso_flagged": flagged if defense == "ecso" else None,
            "model_fingerprint": "f" * 16, "mmproj_fingerprint": "e" * 16, "prompt_version": "ecso-paper-2024.1",
            "decision_rule": "exact", "self_judge": "paper", "seed": 0, "temperature": 0.0,
            "trace": trace if status == "ok" else None}


def judgment_record(sid, defense, label, parse="ok", judge=JUDGE, stale=False):
    """One judgments.jsonl record of response_record's default answer (`stale`: of some other answer)."""
    sha = answer_sha("something else" if stale else f"answer {sid} {defense}")
    return {"key": f"{sid}|{defense}|{judge}", "response_key": f"{sid}|{defense}", "sample_id": sid,
            "defense": defense, "response_sha": sha, "label": label if parse == "ok" else None, "score": None,
            "parse": parse, "raw": str(label), "judge": judge, "prompt": "p"}


def write_run(root: Path, bench: str, samples, responses, judgments, leakage=()) -> Path:
    """A run folder at `root` holding exactly these records, as `ecso eval` would have written it."""
    root.mkdir(parents=True)
    store.write_json_atomic(root / "run.json", {
        "benchmark": bench, "defenses": ["none", "ecso"], "judge": JUDGE, "judges": [JUDGE, "rule@x"],
        "leakage_judge": JUDGE if leakage else None,
        "generation": {"model": "/m/llm.gguf", "model_fingerprint": "f" * 16, "prompt_version": "ecso-paper-2024.1",
                       "decision_rule": "exact", "temperature": 0.0, "seed": 0}})
    store.write_jsonl_atomic(root / "samples.jsonl", samples)
    for name, rows in (("responses.jsonl", responses), ("judgments.jsonl", judgments), ("leakage.jsonl", leakage)):
        log = store.JsonlLog(root / name)
        for r in rows:
            log.append(r)
        log.close()
    return root


def write_vlsbench_run(root: Path) -> Path:
    """VLSBench, 6 samples x 2 defenses, with every kind of unknown:
    v3/none judge error, v1/ecso unparsed, v2/ecso generation error, v3/ecso stale judgment, p1 missing image."""
    samples = [sample_record(s, "vlsbench", "Violent") for s in ("v0", "v1", "v2", "v3")]
    samples += [sample_record("p0", "vlsbench", "Privacy"),
                sample_record("p1", "vlsbench", "Privacy", error="missing image")]
    responses = [response_record(s, "none") for s in ("v0", "v1", "v2", "v3", "p0")] + [
        response_record("p1", "none", "input_error"), response_record("v0", "ecso", flagged=True),
        response_record("v1", "ecso", flagged=True), response_record("v2", "ecso", "error"),
        response_record("v3", "ecso"), response_record("p0", "ecso", flagged=True),
        response_record("p1", "ecso", "input_error")]
    judgments = [judgment_record("v0", "none", "unsafe"), judgment_record("v1", "none", "refusal"),
                 judgment_record("v2", "none", "warning"), judgment_record("v3", "none", None, "error"),
                 judgment_record("p0", "none", "unsafe"), judgment_record("v0", "ecso", "refusal"),
                 judgment_record("v1", "ecso", None, "unparsed"),
                 judgment_record("v3", "ecso", "refusal", stale=True), judgment_record("p0", "ecso", "warning"),
                 judgment_record("p0", "ecso", "unsafe", judge="rule@x")]
    leakage = [{"key": f"{s}|{JUDGE}", "sample_id": s, "label": lab, "parse": p} for s, lab, p in
               (("v0", "leak", "ok"), ("v1", "no_leak", "ok"), ("v2", None, "unparsed"), ("p0", "leak", "ok"))]
    return write_run(root, "vlsbench", samples, responses, judgments, leakage)


def mme_run(root: Path) -> Path:
    """An MME run (write_mme's 8 samples) with recorded answers whose scores the utility tests count by hand."""
    samples = [s.to_dict() for s in load_mme(write_mme(root / "data"))]
    answers = {  # sample index -> (undefended answer, ECSO's final answer, ECSO flagged)
        0: ("Yes", "Yes", False),               # gt Yes: right, right
        1: ("No, there is no bed.", "No", False),  # gt No: right, right
        2: ("Yes", "No", True),                 # gt No: wrong -> right (flagged, regenerated)
        3: ("There is a dog.", "There is a dog.", False),  # gt Yes: "other" both times
        4: ("Yes", "I cannot help with that.", True),  # gt Yes: right -> wrong (over-refusal)
        5: ("no", "no", False),                 # gt No: right, right
        6: ("Yes", "Yes", False),               # gt Yes
        7: ("Yes", "Yes", True),                # gt No: wrong, flagged, same answer (no change)
    }
    responses = []
    for i, s in enumerate(samples):
        none, ecso, flagged = answers[i]
        responses += [response_record(s["id"], "none", answer=none),
                      response_record(s["id"], "ecso", flagged=flagged, answer=ecso)]
    return write_run(root / "mme", "mme", samples, responses, [])
