"""Labelled judgments (query, response, unsafe) for training and evaluating a judge head.

Two sources: a JSONL file with one {"query", "response", "unsafe"} object a line (any user file in that shape),
or a run folder written by `ecso eval`, whose ECSO records hold the engine's own step-2 verdicts (the
self-judge). Also the split and the agreement figures that `ecso heads eval` reports. No torch here.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ecso.runtime.errors import InputError

_EVAL_SAMPLES, _EVAL_RESPONSES = "samples.jsonl", "responses.jsonl"  # ecso.eval.store's run-folder files
_TRUE = {"true", "yes", "unsafe", "1"}
_FALSE = {"false", "no", "safe", "0"}


@dataclass(frozen=True)
class LabelledJudgment:
    """One verdict to learn or to agree with: unsafe is the self-judge's (or a person's) label."""

    query: str
    response: str
    unsafe: bool
    judge_seconds: Optional[float] = None  # how long the self-judge took, when the source recorded it


def _label(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise InputError(f"{where}: 'unsafe' must be true/false (or 1/0, yes/no), got {value!r}")


def read_judgments(path: str | Path) -> list[LabelledJudgment]:
    """Labelled judgments from a JSONL file or an `ecso eval` run folder; a bad line is an error with its number."""
    p = Path(path)
    if p.is_dir():
        return _from_eval_run(p)
    if not p.is_file():
        raise InputError(f"judgment data not found: {p} (give a JSONL file or an `ecso eval` run folder)")
    out = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{n}"
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise InputError(f"{where} is not JSON ({e})") from None
            if not isinstance(rec, dict) or not all(k in rec for k in ("query", "response", "unsafe")):
                raise InputError(f"{where}: each line needs \"query\", \"response\" and \"unsafe\"")
            if not isinstance(rec["query"], str) or not isinstance(rec["response"], str):
                raise InputError(f"{where}: query and response must be strings")
            secs = rec.get("judge_seconds")
            out.append(LabelledJudgment(rec["query"], rec["response"], _label(rec["unsafe"], where),
                                        float(secs) if isinstance(secs, (int, float)) else None))
    if not out:
        raise InputError(f"{p} holds no judgments")
    return out


def _from_eval_run(run_dir: Path) -> list[LabelledJudgment]:
    """The self-judge's verdicts on step 1's answers in an `ecso eval` run (head and guard verdicts left out)."""
    samples_path, responses_path = run_dir / _EVAL_SAMPLES, run_dir / _EVAL_RESPONSES
    if not samples_path.is_file() or not responses_path.is_file():
        raise InputError(f"{run_dir} is not an `ecso eval` run folder (no {_EVAL_SAMPLES} / {_EVAL_RESPONSES})")
    queries = {}
    for line in samples_path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            s = json.loads(line)
            queries[s["id"]] = s["query"]
    latest: dict[str, dict] = {}
    for line in responses_path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line torn by a kill: the run's own reader skips it too
        if isinstance(rec, dict) and rec.get("defense") == "ecso":
            latest[rec["key"]] = rec
    out = []
    for rec in latest.values():
        trace = rec.get("trace") or {}
        judge = str(trace.get("judge", ""))
        if rec.get("status") != "ok" or rec.get("sample_id") not in queries or judge.startswith("head:") \
                or judge in ("guard", "none", ""):
            continue
        steps = [s for s in trace.get("steps", []) if s.get("name") == "judge"]
        secs = steps[0].get("seconds") if steps else None
        out.append(LabelledJudgment(queries[rec["sample_id"]], trace.get("initial_answer", ""),
                                    bool(trace.get("unsafe")), secs))
    if not out:
        raise InputError(f"{run_dir} has no ECSO responses with a self-judge verdict yet; run `ecso eval` first")
    return out


def write_judgments(path: str | Path, items: Sequence[LabelledJudgment]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for j in items:
            f.write(json.dumps({k: v for k, v in asdict(j).items() if v is not None}, ensure_ascii=False) + "\n")


def split_judgments(items: Sequence[LabelledJudgment], heldout_fraction: float = 0.2,
                    seed: int = 0) -> tuple[list[LabelledJudgment], list[LabelledJudgment]]:
    """(train, held-out), stratified by label so both keep the class balance; deterministic for a seed."""
    if not 0.0 < heldout_fraction < 1.0:
        raise InputError(f"the held-out fraction must be between 0 and 1, got {heldout_fraction}")
    train: list[LabelledJudgment] = []
    held: list[LabelledJudgment] = []
    rng = random.Random(seed)
    for label in (False, True):
        group = [j for j in items if j.unsafe == label]
        if len(group) < 4:
            raise InputError(f"need at least 4 {'unsafe' if label else 'safe'} examples to train and hold some "
                             f"out, got {len(group)}; add more labelled data")
        rng.shuffle(group)
        k = max(1, round(len(group) * heldout_fraction))
        held += group[:k]
        train += group[k:]
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


@dataclass(frozen=True)
class Agreement:
    """How well a head agrees with the self-judge (the labels): unsafe is the positive class."""

    n: int
    accuracy: float
    f1: float
    precision: float
    recall: float
    tp: int
    fp: int
    tn: int
    fn: int
    safe_path_ratio_head: float  # requests that would stop after step 2 (judged safe) with the head
    safe_path_ratio_self: float  # ... with the self-judge
    head_seconds_mean: Optional[float] = None
    self_judge_seconds_mean: Optional[float] = None
    provider: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def agreement(labels: Sequence[bool], predictions: Sequence[bool], head_seconds: Sequence[float] = (),
              self_seconds: Sequence[Optional[float]] = (), provider: str = "") -> Agreement:
    y, p = np.asarray(labels, bool), np.asarray(predictions, bool)
    if len(y) == 0 or len(y) != len(p):
        raise InputError("agreement needs as many predictions as labels, at least one")
    tp, fp = int((y & p).sum()), int((~y & p).sum())
    tn, fn = int((~y & ~p).sum()), int((y & ~p).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    known = [s for s in self_seconds if s is not None]
    return Agreement(len(y), (tp + tn) / len(y), f1, precision, recall, tp, fp, tn, fn,
                     float((~p).mean()), float((~y).mean()),
                     float(np.mean(head_seconds)) if len(head_seconds) else None,
                     float(np.mean(known)) if known else None, provider)


def evaluate_judge_head(head, items: Sequence[LabelledJudgment], batch_size: int = 16) -> Agreement:
    """Runs the head on every (query, response) and compares with the labels (`ecso heads eval`)."""
    verdicts = head.judge_batch([(j.query, j.response) for j in items], batch_size=batch_size)
    return agreement([j.unsafe for j in items], [v.unsafe for v in verdicts], [v.seconds for v in verdicts],
                     [j.judge_seconds for j in items], verdicts[0].provider if verdicts else "")
