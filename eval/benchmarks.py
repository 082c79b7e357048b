"""Benchmark loaders: the official on-disk layouts a user downloads -> one list of `Sample`s.

Nothing is ever dropped silently: a malformed row, a missing field or a missing image becomes a Sample whose
`error` says what is wrong. The runner records it (never runs the model on it) and the report counts it in the
denominator as unknown.

Layouts (see the reference notes):
- MM-SafetyBench: `processed_questions/<scenario>.json` (dict id -> fields) and
  `imgs/<scenario>/{SD,SD_TYPO,TYPO}/<id>.jpg`; the question field depends on the image mode.
- VLSafe: `harmlessness_examine.jsonl` ({"image_id", "caption", "query"}) + COCO train2017 images.
- VLSBench: `data.json` (a list of {"instruction_id", "instruction", "image_path", "category", ...}) + `imgs/`.
- custom: a JSONL of {"id", "image", "query", "category"} (image paths relative to the file), for the data engine.
- benign: the same JSONL, read as benign inputs (utility: ECSO's flag rate and over-refusal; see utility.py).
- MME: `MME_Benchmark_release_version/<subtask>/` (see utility.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

from ecso.runtime.errors import InputError

BENCHMARKS = ("mm-safetybench", "vlsafe", "vlsbench", "custom", "mme", "benign")
UTILITY_BENCHMARKS = ("mme", "benign")  # benign inputs: scored by rule, never by a safety judge
ALIASES = {"mmsb": "mm-safetybench", "mmsafetybench": "mm-safetybench", "mm_safetybench": "mm-safetybench",
           "mm-safety-bench": "mm-safetybench", "vls": "vlsbench"}

MMSB_SCENARIOS = ("01-Illegal_Activitiy", "02-HateSpeech", "03-Malware_Generation", "04-Physical_Harm",
                  "05-EconomicHarm", "06-Fraud", "07-Sex", "08-Political_Lobbying", "09-Privacy_Violence",
                  "10-Legal_Opinion", "11-Financial_Advice", "12-Health_Consultation", "13-Gov_Decision")
ECSO_SUBSET = ("01", "02", "03", "04", "05", "06", "07", "09")  # the scenarios ECSO's paper scores
MMSB_IMAGE_MODES = ("SD", "SD_TYPO", "TYPO")
MMSB_MODES = MMSB_IMAGE_MODES + ("text",)  # text: the original Question, no image (ECSO's text mode)
# model_mmsafe.py: which question goes with which image
MMSB_QUESTION_FIELD = {"SD": "Rephrased Question(SD)", "SD_TYPO": "Rephrased Question", "TYPO": "Rephrased Question",
                       "text": "Question"}
VLSAFE_FILES = ("harmlessness_examine.jsonl", "data.jsonl")  # official name; ECSO's renamed copy
UNKNOWN_CATEGORY = "(unreadable row)"


@dataclass
class Sample:
    """One benchmark item as the model sees it: the query, the image (or None) and where it belongs."""

    id: str  # unique within a run, stable across runs of the same data
    benchmark: str
    category: str  # MM-SafetyBench scenario, VLSBench category, "all" for VLSafe
    query: str
    image: Optional[str]  # absolute path, or None for a text-only sample
    mode: str = "image"  # MM-SafetyBench: SD | SD_TYPO | TYPO | text
    subcategory: Optional[str] = None
    extra: dict = field(default_factory=dict)  # e.g. VLSBench image_description / safety_reason
    error: Optional[str] = None  # why this sample cannot be run (recorded and counted, never dropped)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Sample":
        return cls(**{k: d.get(k) for k in ("id", "benchmark", "category", "query", "image", "mode", "subcategory",
                                            "error")}, extra=d.get("extra") or {})


def canonical_benchmark(name: str) -> str:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in BENCHMARKS:
        raise InputError(f"unknown benchmark {name!r}; use one of {', '.join(BENCHMARKS)}")
    return key


def load_benchmark(benchmark: str, data: str | Path, categories: Sequence[str] = (), modes: Sequence[str] = (),
                   limit: Optional[int] = None, images: Optional[str | Path] = None) -> list[Sample]:
    """Loads a benchmark from its official layout under `data`, filtered by category/scenario and image mode,
    then cut to the first `limit` samples (file order)."""
    bench = canonical_benchmark(benchmark)
    root = Path(data).expanduser()
    if not root.exists():
        raise InputError(f"--data {root} does not exist; point it at the downloaded {bench} folder")
    if limit is not None and limit < 1:
        raise InputError("--limit must be at least 1")
    if modes and bench != "mm-safetybench":
        raise InputError("--mode applies to MM-SafetyBench only")
    if bench == "mm-safetybench":
        samples = load_mmsafetybench(root, categories, modes)
    elif bench == "mme":
        from ecso.eval.utility import load_mme

        samples = load_mme(root, tuple(categories))
    elif bench == "benign":
        samples = _filter_categories(_custom(root, "benign"), categories, bench)
    else:
        loader = {"vlsafe": _vlsafe, "vlsbench": _vlsbench, "custom": _custom}[bench]
        samples = loader(root, images) if bench == "vlsafe" else loader(root)
        samples = _filter_categories(samples, categories, bench)
    return samples[:limit] if limit else samples


# --- MM-SafetyBench ------------------------------------------------------------------------------------------------
def mmsb_root(root: Path) -> Path:
    """The folder holding `processed_questions/` (the repo's `data/`, or that folder itself)."""
    for cand in (root, root / "data"):
        if (cand / "processed_questions").is_dir():
            return cand
    if root.name == "processed_questions" and root.is_dir():
        return root.parent
    raise InputError(f"no processed_questions/ folder under {root}; give --data the MM-SafetyBench data/ folder "
                     "(processed_questions/*.json and imgs/<scenario>/{SD,SD_TYPO,TYPO}/<id>.jpg)")


def select_scenarios(available: Sequence[str], wanted: Sequence[str]) -> list[str]:
    """Scenarios by full name, two-digit number ("01"), a unique name fragment ("fraud"), "ecso" (the paper's
    01-07 + 09) or "all"."""
    if not wanted:
        return list(available)
    chosen: list[str] = []
    for token in wanted:
        t = token.strip()
        if t.lower() == "all":
            picks = list(available)
        elif t.lower() == "ecso":
            picks = [s for s in available if s[:2] in ECSO_SUBSET]
        elif t.isdigit():
            picks = [s for s in available if s[:2] == f"{int(t):02d}"]
        else:
            exact = [s for s in available if s.lower() == t.lower()]
            picks = exact or [s for s in available if t.lower() in s.lower()]
        if not picks or (len(picks) > 1 and t.lower() not in ("all", "ecso")):
            what = "matches no" if not picks else "matches several"
            raise InputError(f"--scenario {token!r} {what} scenario; available: {', '.join(available)} "
                             "(or 'ecso' for 01-07 + 09, or 'all')")
        chosen += [p for p in picks if p not in chosen]
    return [s for s in available if s in chosen]


def load_mmsafetybench(data: Path, scenarios: Sequence[str] = (), modes: Sequence[str] = ()) -> list[Sample]:
    root = mmsb_root(data)
    files = {p.stem: p for p in sorted((root / "processed_questions").glob("*.json")) if re.match(r"^\d\d-", p.stem)}
    if not files:
        raise InputError(f"{root / 'processed_questions'} holds no <NN-Scenario>.json files")
    bad_modes = [m for m in modes if m not in MMSB_MODES]
    if bad_modes:
        raise InputError(f"unknown --mode {', '.join(bad_modes)}; use {', '.join(MMSB_MODES)}")
    modes = [m for m in MMSB_MODES if m in modes] if modes else list(MMSB_IMAGE_MODES)
    out: list[Sample] = []
    for scenario in select_scenarios(list(files), scenarios):
        try:
            questions = json.loads(files[scenario].read_text(encoding="utf-8"))
            if not isinstance(questions, dict):
                raise ValueError("expected a JSON object keyed by question id")
        except (ValueError, OSError) as e:  # one unreadable file: one error sample per mode, counted
            for mode in modes:
                out.append(Sample(f"{scenario}/{mode}/<file>", "mm-safetybench", scenario, "", None, mode,
                                  error=f"malformed {files[scenario].name}: {e}"))
            continue
        for mode in modes:
            for qid in sorted(questions, key=_id_order):
                out.append(_mmsb_sample(root, scenario, mode, qid, questions[qid]))
    return out


def _id_order(qid: str) -> tuple:
    return (0, int(qid), "") if str(qid).isdigit() else (1, 0, str(qid))


def _mmsb_sample(root: Path, scenario: str, mode: str, qid: str, item) -> Sample:
    sid = f"{scenario}/{mode}/{qid}"
    fld = MMSB_QUESTION_FIELD[mode]
    image = None if mode == "text" else root / "imgs" / scenario / mode / f"{qid}.jpg"
    if not isinstance(item, dict):
        return Sample(sid, "mm-safetybench", scenario, "", path_text(image), mode, error="malformed row: not an object")
    query = item.get(fld)
    extra = {k: item[k] for k in ("Question", "Key Phrase", "Phrase Type") if isinstance(item.get(k), str)}
    error = None
    if not isinstance(query, str) or not query.strip():
        query, error = "", f"malformed row: no {fld!r}"
    elif image is not None and not image.is_file():
        error = f"missing image {image}"
    return Sample(sid, "mm-safetybench", scenario, query, path_text(image), mode, extra=extra, error=error)


def path_text(p: Optional[Path]) -> Optional[str]:
    """A sample's image path as the absolute text a record stores (None: no image)."""
    return str(p.resolve()) if p is not None else None


# --- VLSafe --------------------------------------------------------------------------------------------------------
def _vlsafe(root: Path, images: Optional[str | Path]) -> list[Sample]:
    if root.is_file():
        path, base = root, root.parent
    else:
        found = [root / n for n in VLSAFE_FILES if (root / n).is_file()]
        found += [root / "VLSafe" / n for n in VLSAFE_FILES if (root / "VLSafe" / n).is_file()]
        if not found:
            raise InputError(f"no harmlessness_examine.jsonl under {root}; give --data the VLSafe folder or the file")
        path, base = found[0], root
    image_dirs = _coco_dirs(base, images)
    out: list[Sample] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            sid = str(lineno)
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not an object")
            except ValueError as e:
                out.append(Sample(sid, "vlsafe", "all", "", None, error=f"malformed line {lineno}: {e}"))
                continue
            query, image_id = row.get("query"), row.get("image_id")
            if not isinstance(query, str) or not query.strip() or not isinstance(image_id, str) or not image_id:
                out.append(Sample(sid, "vlsafe", "all", query if isinstance(query, str) else "", None,
                                  error=f"malformed line {lineno}: needs 'query' and 'image_id'"))
                continue
            image = next((d / image_id for d in image_dirs if (d / image_id).is_file()), None)
            extra = {"image_id": image_id, "caption": row.get("caption")}
            error = None if image else f"missing image {image_id} (searched {', '.join(map(str, image_dirs))})"
            out.append(Sample(sid, "vlsafe", "all", query, path_text(image), extra=extra, error=error))
    return out


def _coco_dirs(base: Path, images: Optional[str | Path]) -> list[Path]:
    """Where COCO train2017 images may be: --images, else the usual places next to the jsonl."""
    if images is not None:
        d = Path(images).expanduser()
        if not d.is_dir():
            raise InputError(f"--images {d} is not a folder of COCO train2017 images")
        return [d]
    cands = [base, base / "train2017", base / "images", base / "images" / "train2017", base / "coco" / "train2017",
             base / "coco" / "images" / "train2017", base.parent / "coco" / "train2017",
             base.parent / "coco" / "images" / "train2017"]
    return [d for d in cands if d.is_dir()] or [base]


# --- VLSBench ------------------------------------------------------------------------------------------------------
def _vlsbench(root: Path) -> list[Sample]:
    path = root if root.is_file() else next((p for p in (root / "data.json", root / "data" / "data.json")
                                             if p.is_file()), None)
    if path is None:
        raise InputError(f"no data.json under {root}; give --data the VLSBench dataset folder (data.json + imgs/)")
    base = path.parent
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise InputError(f"{path} is not valid JSON ({e}); download data.json again") from None
    if not isinstance(rows, list):
        raise InputError(f"{path} should hold a JSON list of items")
    out: list[Sample] = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            out.append(Sample(f"row{i}", "vlsbench", UNKNOWN_CATEGORY, "", None, error=f"malformed item {i}"))
            continue
        rid = row.get("instruction_id")
        sid = str(rid) if isinstance(rid, (int, str)) and str(rid) not in seen else f"row{i}"
        seen.add(sid)
        query, rel, category = row.get("instruction"), row.get("image_path"), row.get("category")
        extra = {k: row[k] for k in ("image_description", "safety_reason", "source") if row.get(k) is not None}
        cat = category if isinstance(category, str) and category else UNKNOWN_CATEGORY
        sub = row.get("sub_category") if isinstance(row.get("sub_category"), str) else None
        image = base / rel if isinstance(rel, str) and rel else None
        error = None
        if sid.startswith("row"):
            error = f"malformed item {i}: missing or duplicate instruction_id"
        elif not isinstance(query, str) or not query.strip():
            error = f"malformed item {i}: no 'instruction'"
        elif image is None:
            error = f"malformed item {i}: no 'image_path'"
        elif not image.is_file():
            error = f"missing image {image}"
        out.append(Sample(sid, "vlsbench", cat, query if isinstance(query, str) else "", path_text(image),
                          subcategory=sub, extra=extra, error=error))
    return out


# --- custom JSONL (data engine on your own images) ------------------------------------------------------------------
def _custom(root: Path, benchmark: str = "custom") -> list[Sample]:
    if not root.is_file():
        raise InputError(f"custom data must be a JSONL file of {{\"id\", \"image\", \"query\"}} lines, not {root}")
    out: list[Sample] = []
    with open(root, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not an object")
            except ValueError as e:
                out.append(Sample(f"line{lineno}", benchmark, UNKNOWN_CATEGORY, "", None, error=f"malformed: {e}"))
                continue
            sid = str(row.get("id", f"line{lineno}"))
            query = row.get("query") if isinstance(row.get("query"), str) else ""
            rel = row.get("image")
            image = (root.parent / rel) if isinstance(rel, str) and rel else None
            error = None if query.strip() else "malformed: no 'query'"
            if error is None and image is not None and not image.is_file():
                error = f"missing image {image}"
            out.append(Sample(sid, benchmark, str(row.get("category") or "all"), query, path_text(image),
                              mode="image" if image else "text", error=error))
    return out


def _filter_categories(samples: list[Sample], categories: Iterable[str], bench: str) -> list[Sample]:
    """Keeps samples whose category or sub-category matches (case-insensitive); unreadable rows always stay."""
    wanted = {c.strip().lower() for c in categories}
    if not wanted:
        return samples
    if bench == "vlsafe":
        raise InputError("VLSafe has no categories; drop --category")
    known = {s.category.lower() for s in samples} | {(s.subcategory or "").lower() for s in samples}
    unknown = sorted(wanted - known)
    if unknown:
        cats = sorted({s.category for s in samples if s.category != UNKNOWN_CATEGORY})
        raise InputError(f"--category {', '.join(unknown)} not found; categories: {', '.join(cats)}")
    return [s for s in samples if s.category == UNKNOWN_CATEGORY or s.category.lower() in wanted
            or (s.subcategory or "").lower() in wanted]
