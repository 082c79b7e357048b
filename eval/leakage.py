"""Visual safety information leakage (VSIL): how often the harm is already visible in the text query alone.

VLSBench's point: when the text query by itself says what is harmful, a "multimodal" safety number mostly measures
text safety. `ecso eval ... --leakage` asks the judge about each query without its image (rule judge: harm words;
LLM / OpenAI judges: our versioned yes/no prompt, judge_prompts.LEAKAGE_PROMPT) and the report gives, per
benchmark and category (and image mode on MM-SafetyBench), the share of samples whose text already leaks the harm.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Callable, Iterable

from ecso.eval.benchmarks import Sample
from ecso.eval.judge_prompts import LEAKAGE_PROMPT_VERSION


def query_sha(query: str) -> str:
    return hashlib.sha256(query.encode("utf-8")).hexdigest()[:16]


def judge_leakage(samples: Iterable[Sample], judge, log, on_done: Callable[[], None] = lambda: None) -> int:
    """Judges each sample's text query (one judge call per distinct query; every sample gets its own record).
    Returns the number of records written."""
    verdicts: dict[str, dict] = {}
    n = 0
    for s in samples:
        qsha = query_sha(s.query)
        if qsha not in verdicts or verdicts[qsha]["parse"] == "error":
            verdicts[qsha] = judge.leakage(s.query).to_dict()
        log.append({"key": f"{s.id}|{judge.id}", "sample_id": s.id, "category": s.category, "mode": s.mode,
                    "query_sha": qsha, "leakage_prompt_version": LEAKAGE_PROMPT_VERSION, **verdicts[qsha],
                    "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        n += 1
        on_done()
    return n


def leakage_rows(samples: list[dict], records: dict[str, dict], judge_id: str, group_by_mode: bool) -> list[dict]:
    """Per category (and mode): n_total, n_judged, n_unknown, n_leak and leak_rate = n_leak / n_total (in %).
    Samples without a usable verdict (no query, failed or unparsed judge call, not judged yet) are unknown."""
    groups: dict[tuple, list[dict]] = {}
    for s in samples:
        key = (s["category"], s["mode"]) if group_by_mode else (s["category"], None)
        groups.setdefault(key, []).append(s)
    if {k[0].lower() for k in groups} == {"all"} and not group_by_mode:
        groups = {}  # one unnamed split (VLSafe): only the "All" row
    rows = [_row(k, groups[k], records, judge_id) for k in sorted(groups, key=lambda k: (k[0], k[1] or ""))]
    rows.append(_row(("All", None), samples, records, judge_id))
    return rows


def _row(key: tuple, samples: list[dict], records: dict[str, dict], judge_id: str) -> dict:
    n_leak = n_judged = 0
    for s in samples:
        rec = records.get(f"{s['id']}|{judge_id}")
        if rec and rec.get("parse") == "ok":
            n_judged += 1
            n_leak += rec.get("label") == "leak"
    n = len(samples)
    return {"category": key[0], "mode": key[1], "n_total": n, "n_judged": n_judged, "n_unknown": n - n_judged,
            "n_leak": n_leak, "leak_rate": _pct(n_leak, n)}


def _pct(k: int, n: int) -> float | None:
    return round(100.0 * k / n, 2) if n else None
