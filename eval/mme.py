"""MME (a utility benchmark: does ECSO hurt helpfulness?): loading its release folder and scoring it by its own
eval_tool/calculation.py rules (no GPT judge).

Release layout (`MME_Benchmark_release_version/`): one folder per subtask. Each image has a text file of
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

from ecso.eval.samples import Sample, path_str
from ecso.eval.utility import answer_of, flag_stats
from ecso.runtime.errors import InputError

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_IMAGE_EXTS = (".jpg", ".jpeg", ".png")
# LLaVA-1.5's MME question file (llava_mme.jsonl) adds this line to every question; ECSO's utility runs use it.
LLAVA_SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


# --- loading --------------------------------------------------------------------------------------------------
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
            out.append(Sample(sid, "mme", task, question.strip(), path_str(image), extra=extra, error=error))
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


def mme_subtask(samples: list[dict], responses: dict, defense: str) -> dict:
    """Counts and score of one subtask under one defense."""
    images: dict[str, list[bool]] = {}
    correct = unknown = 0
    for s in samples:
        answer = answer_of(responses, s["id"], defense)
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
