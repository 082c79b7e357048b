"""Utility: does ECSO hurt helpfulness? MME scored by its own rules, and a benign-set mode for any custom JSONL.

A defence that flags benign answers looks perfect on safety benchmarks, so ECSO's paper also reports MME, MM-Vet and
MMBench. Here, with and without ECSO from one model pass (the undefended answer is ECSO's step 1):
- MME scores as its eval_tool/calculation.py computes them (no GPT judge);
- ECSO's flag rate on these benign inputs (how often step 2 fires) and how often the regenerated answer changed
  the score (right -> wrong, wrong -> right);
- benign sets (`ecso eval benign --data my.jsonl`, the custom JSONL format): flag rate, changed answers, and the
  refusal rate of each defense by the rule judge's refusal patterns (over-refusal).

MME release layout (`MME_Benchmark_release_version/`): one folder per subtask. Each image has a text file of
tab-separated `question<TAB>answer` lines (two yes/no questions per image), either beside the image
(`<subtask>/<name>.jpg` + `<subtask>/<name>.txt`) or in `questions_answers_YN/` next to `images/`.

calculation.py's scoring: the reply is lowercased; exactly "yes"/"no" is that answer, else "yes" in its first four
characters is yes, else "no" there is no, else "other" (wrong). acc = correct questions / questions, acc+ = images
with every question correct / images, subtask score = 100 * acc + 100 * acc+ (max 200); perception = sum of the
10 perception subtasks, cognition = sum of the 4 cognition subtasks. We strip surrounding whitespace from the reply
first (LLaVA's answers reach calculation.py stripped). A sample with no answer (missing image, failed generation)
counts as wrong and is reported as unknown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ecso.eval.benchmarks import Sample, path_text
from ecso.runtime.errors import InputError

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_IMAGE_EXTS = (".jpg", ".jpeg", ".png")
# LLaVA-1.5's MME question file (llava_mme.jsonl) adds this line to every question; ECSO's utility runs use it.
LLAVA_SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


# --- loading ---------------------------------------------------------------------------------------------------------
def mme_root(root: Path) -> Path:
    for cand in (root, root / "MME_Benchmark_release_version", root / "MME_Benchmark_release_version" /
                 "MME_Benchmark"):
        if any((cand / t).is_dir() for t in MME_PERCEPTION + MME_COGNITION):
            return cand
    raise InputError(f"no MME subtask folders (existence/, count/, ... code_reasoning/) under {root}; give --data "
                     "the MME_Benchmark_release_version folder")


def load_mme(data: Path, subtasks: tuple[str, ...] = ()) -> list[Sample]:
    """One Sample per question: id `subtask/image/k`, category = subtask, extra = the expected answer and group."""
    root = mme_root(data)
    known = [t for t in MME_PERCEPTION + MME_COGNITION if (root / t).is_dir()]
    wanted = {t.lower() for t in subtasks}
    bad = sorted(wanted - {t.lower() for t in known})
    if bad:
        raise InputError(f"--category {', '.join(bad)} is not an MME subtask here; subtasks: {', '.join(known)}")
    out: list[Sample] = []
    for task in known:
        if wanted and task.lower() not in wanted:
            continue
        out += _subtask(root / task, task)
    return out


def _subtask(folder: Path, task: str) -> list[Sample]:
    if (folder / "questions_answers_YN").is_dir():
        texts, image_dirs = sorted((folder / "questions_answers_YN").glob("*.txt")), [folder / "images"]
    else:
        texts, image_dirs = sorted(folder.glob("*.txt")), [folder]
    group = "perception" if task in MME_PERCEPTION else "cognition"
    out: list[Sample] = []
    for txt in texts:
        image = next((d / (txt.stem + ext) for d in image_dirs for ext in MME_IMAGE_EXTS
                      if (d / (txt.stem + ext)).is_file()), None)
        name = image.name if image else txt.stem
        try:
            lines = [ln for ln in txt.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as e:
            out.append(Sample(f"{task}/{name}/<file>", "mme", task, "", None, error=f"unreadable {txt.name}: {e}",
                              extra={"group": group, "image_name": name}))
            continue
        for k, line in enumerate(lines):
            sid = f"{task}/{name}/{k}"
            question, _, answer = line.rstrip("\n").rpartition("\t")
            extra = {"group": group, "image_name": name, "answer": answer.strip()}
            error = None
            if not question.strip() or answer.strip().lower() not in ("yes", "no"):
                error = f"malformed line {k + 1} of {txt.name}: expected question<TAB>Yes|No"
            elif image is None:
                error = f"missing image {txt.stem}.jpg/.png for {txt.name}"
            out.append(Sample(sid, "mme", task, question.strip(), path_text(image), extra=extra, error=error))
    return out


# --- scoring ---------------------------------------------------------------------------------------------------------
def mme_answer(reply: Optional[str]) -> str:
    """calculation.py's parse_pred_ans on the lowercased, stripped reply: yes | no | other."""
    if reply is None:
        return "other"
    text = reply.strip().lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def _answer_of(responses: dict, sid: str, defense: str) -> Optional[str]:
    r = responses.get(f"{sid}|{defense}")
    return r["answer"] if r and r.get("status") == "ok" else None


def mme_subtask(samples: list[dict], responses: dict, defense: str) -> dict:
    """Counts and score of one subtask under one defense."""
    images: dict[str, list[bool]] = {}
    correct = unknown = 0
    for s in samples:
        answer = _answer_of(responses, s["id"], defense)
        expected = (s["extra"].get("answer") or "").lower()
        ok = answer is not None and expected in ("yes", "no") and mme_answer(answer) == expected
        unknown += answer is None
        correct += ok
        images.setdefault(s["extra"].get("image_name", s["id"]), []).append(ok)
    n_q, n_img = len(samples), len(images)
    acc = 100.0 * correct / n_q if n_q else 0.0
    acc_plus = 100.0 * sum(all(v) for v in images.values()) / n_img if n_img else 0.0
    return {"n_questions": n_q, "n_images": n_img, "n_correct": correct,
            "n_images_all_correct": sum(all(v) for v in images.values()), "n_unknown": unknown,
            "acc": round(acc, 2), "acc_plus": round(acc_plus, 2), "score": round(acc + acc_plus, 2)}


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
        before = _answer_of(responses, s["id"], "none")
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


def _mme_correct(sample: dict, answer: str) -> bool:
    return mme_answer(answer) == (sample["extra"].get("answer") or "").lower()


def mme_report(samples: list[dict], responses: dict, defenses: list[str]) -> dict:
    """Per subtask and per group (perception / cognition): scores under each defense, and ECSO's effect."""
    by_task: dict[str, list[dict]] = {}
    for s in samples:
        by_task.setdefault(s["category"], []).append(s)
    order = [t for t in MME_PERCEPTION + MME_COGNITION if t in by_task]
    rows = []
    for task in order:
        row = {"subtask": task, "group": "perception" if task in MME_PERCEPTION else "cognition"}
        for d in defenses:
            row[d] = mme_subtask(by_task[task], responses, d)
        if "ecso" in defenses:
            row["ecso_effect"] = flag_stats(by_task[task], responses, _mme_correct)
        rows.append(row)
    totals = []
    for group in ("perception", "cognition"):
        members = [r for r in rows if r["group"] == group]
        if not members:
            continue
        tasks = MME_PERCEPTION if group == "perception" else MME_COGNITION
        total = {"group": group, "n_subtasks": len(members), "n_subtasks_in_mme": len(tasks),
                 "max_score": 200 * len(tasks)}
        for d in defenses:
            total[d] = round(sum(r[d]["score"] for r in members), 2)
        if "ecso" in defenses:
            group_samples = [s for s in samples if s["category"] in {r["subtask"] for r in members}]
            total["ecso_effect"] = flag_stats(group_samples, responses, _mme_correct)
        totals.append(total)
    return {"subtasks": rows, "totals": totals,
            "ecso_effect": flag_stats(samples, responses, _mme_correct) if "ecso" in defenses else None}


def benign_report(samples: list[dict], responses: dict, defenses: list[str]) -> dict:
    """Over-refusal on a benign set: per category, the refusal rate of each defense (rule judge's refusal patterns
    on the final answer) and ECSO's flag rate / changed answers."""
    from ecso.eval.judges import RuleJudge

    rule = RuleJudge()
    groups: dict[str, list[dict]] = {}
    for s in samples:
        groups.setdefault(s["category"], []).append(s)
    rows = []
    for cat in sorted(groups) + (["All"] if len(groups) > 1 else []):
        members = samples if cat == "All" else groups[cat]
        row: dict = {"category": cat, "n_samples": len(members)}
        for d in defenses:
            answers = [_answer_of(responses, s["id"], d) for s in members]
            refused = sum(a is not None and rule.classify(a)[0] == "refusal" for a in answers)
            unknown = sum(a is None for a in answers)
            row[d] = {"refused": refused, "n_unknown": unknown, "refusal_rate": _pct(refused, len(members))}
        if "ecso" in defenses:
            row["ecso_effect"] = flag_stats(members, responses)
        rows.append(row)
    return {"rows": rows, "refusal_rule": rule.id}


def _pct(k: int, n: int) -> Optional[float]:
    return round(100.0 * k / n, 2) if n else None
