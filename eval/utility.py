"""Utility: does ECSO hurt helpfulness? MME scored by its own rules, and a benign-set mode for any custom JSONL.

A defence that flags benign answers looks perfect on safety benchmarks, so ECSO's paper also reports MME, MM-Vet and
MMBench. Here, with and without ECSO from one model pass (the undefended answer is ECSO's step 1):
- MME scores as its eval_tool/calculation.py computes them (no GPT judge; mme.py);
- ECSO's flag rate on these benign inputs (how often step 2 fires) and how often the regenerated answer changed
  the score (right -> wrong, wrong -> right);
- benign sets (`ecso eval benign --data my.jsonl`, the custom JSONL format): flag rate, changed answers, and the
  refusal rate of each defense by the rule judge's refusal patterns (over-refusal).

MME's loading and scoring: mme.py.
"""

from __future__ import annotations

from typing import Optional


def answer_of(responses: dict, sid: str, defense: str) -> Optional[str]:
    r = responses.get(f"{sid}|{defense}")
    return r["answer"] if r and r.get("status") == "ok" else None


def flag_stats(samples: list[dict], responses: dict, score=None) -> dict:
    """ECSO on benign inputs: how often step 2 fired, how often the final answer differs from the undefended one,
    and (with `score(sample, answer) -> bool`) how often that changed the score."""
    flagged = changed = to_wrong = to_right = n = 0
    for s in samples:
        e = responses.get(f"{s['id']}|ecso")
        if not e or e.get("status") != "ok":
            continue
        n += 1
        flagged += bool(e.get("ecso_flagged"))
        before = answer_of(responses, s["id"], "none")
        if before is None:
            before = (e.get("trace") or {}).get("initial_answer")
        if before is not None and before != e["answer"]:
            changed += 1
            if score is not None:
                was, now = score(s, before), score(s, e["answer"])
                to_wrong += was and not now
                to_right += now and not was
    out = {"n_samples": len(samples), "n_ecso_answers": n, "ecso_flagged": flagged,
           "flag_rate": _pct(flagged, len(samples)), "answers_changed": changed}
    if score is not None:
        out.update({"score_changed": to_wrong + to_right, "right_to_wrong": to_wrong, "wrong_to_right": to_right})
    return out


def benign_report(samples: list[dict], responses: dict, defenses: list[str]) -> dict:
    """Over-refusal on a benign set: per category, the refusal rate of each defense (rule judge's refusal patterns
    on the final answer) and ECSO's flag rate / changed answers."""
    from ecso.eval.rule_judge import RuleJudge

    rule = RuleJudge()
    groups: dict[str, list[dict]] = {}
    for s in samples:
        groups.setdefault(s["category"], []).append(s)
    rows = []
    for cat in sorted(groups) + (["All"] if len(groups) > 1 else []):
        members = samples if cat == "All" else groups[cat]
        row: dict = {"category": cat, "n_samples": len(members)}
        for d in defenses:
            answers = [answer_of(responses, s["id"], d) for s in members]
            refused = sum(a is not None and rule.classify(a)[0] == "refusal" for a in answers)
            unknown = sum(a is None for a in answers)
            row[d] = {"refused": refused, "n_unknown": unknown, "refusal_rate": _pct(refused, len(members))}
        if "ecso" in defenses:
            row["ecso_effect"] = flag_stats(members, responses)
        rows.append(row)
    return {"rows": rows, "refusal_rule": rule.id}


def _pct(k: int, n: int) -> Optional[float]:
    return round(100.0 * k / n, 2) if n else None
