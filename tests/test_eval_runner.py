"""The resumable runner on the real demo model: SIGKILL and restart lose and double nothing, a torn last line is
cut, settings cannot change silently, bad rows are recorded and counted, judgments live apart from answers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from support.benchmark_files import write_mmsb, write_vlsafe
from support.fake_judge import FakeJudgeServer
from support.killed_eval import eval_command, kill_after_records

from ecso.eval import store
from ecso.eval.report import build_report
from ecso.eval.runner import EvalConfig, JudgeSpec, check_resumable, generation_identity, run_eval
from ecso.runtime import EcsoOptions, EngineConfig, InputError


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def config(demo_files, bench, data, out, **kw) -> EvalConfig:
    engine = EngineConfig(model=demo_files[0], mmproj=demo_files[1], n_ctx=2048)
    opts = kw.pop("options", EcsoOptions(max_tokens=16, caption_max_tokens=16))
    return EvalConfig(bench, str(data), str(out), engine, opts, progress=False, **kw)


# --- the log itself -----------------------------------------------------------------------------------------------
@pytest.mark.fast
def test_torn_last_line_is_ignored_by_readers_and_cut_by_the_writer(tmp_path):
    path = tmp_path / "responses.jsonl"
    log = store.JsonlLog(path)
    for k in ("a|none", "a|ecso", "b|none"):
        log.append({"key": k, "answer": k.upper()})
    log.close()
    good = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b'{"key": "b|ecso", "answer": "half a rec')  # what a kill in the middle of write() leaves
    seen = store.read_log(path)
    assert list(seen.records) == ["a|none", "a|ecso", "b|none"] and seen.torn_bytes > 0
    assert path.read_bytes() != good  # reading does not touch the file
    log = store.JsonlLog(path)
    assert log.repaired_bytes == seen.torn_bytes and path.read_bytes() == good
    log.append({"key": "b|ecso", "answer": "B"})
    log.append({"key": "a|none", "answer": "again"})  # a retried key: the last record wins
    log.close()
    assert store.read_log(path).records["a|none"]["answer"] == "again" and len(store.read_log(path).records) == 4


def test_settings_that_shape_answers_cannot_change_within_a_run(demo_files, tmp_path):
    cfg = config(demo_files, "vlsafe", tmp_path, tmp_path)
    ident = generation_identity(cfg)
    prev = {"benchmark": "vlsafe", "generation": ident}
    assert check_resumable(prev, "vlsafe", dict(ident), force=False) == []
    moved = dict(ident, model="/elsewhere/same-file.gguf")
    assert check_resumable(prev, "vlsafe", moved, force=False) == []  # a moved file: the fingerprint decides
    for change in ({"model_fingerprint": "0" * 16}, {"prompt_version": "ecso-paper-2099"}, {"seed": 1},
                   {"decision_rule": "contains"}, {"temperature": 0.2}):
        with pytest.raises(InputError, match="--force"):
            check_resumable(prev, "vlsafe", dict(ident, **change), force=False)
        assert "--force" in check_resumable(prev, "vlsafe", dict(ident, **change), force=True)[0]
    with pytest.raises(InputError, match="holds 'vlsafe'"):
        check_resumable(prev, "vlsbench", ident, force=True)


# --- SIGKILL and resume ---------------------------------------------------------------------------------------
def test_sigkill_then_restart_loses_nothing_and_doubles_nothing(demo_files, tmp_path):
    """8 samples x 2 defenses: kill -9 after the first records, add the torn line a kill mid-write leaves,
    restart; every (sample, defense) is recorded exactly once and the records from before the kill are kept."""
    data = write_mmsb(tmp_path, {"01-Illegal_Activitiy": ["0", "1"], "08-Political_Lobbying": ["0", "3"]})
    out = tmp_path / "run"
    cmd = eval_command(data, out)
    responses = out / "responses.jsonl"
    kill_after_records(cmd, responses, 3, timeout=240)
    before = store.read_log(responses)
    n_before = len(before.records)
    assert 3 <= n_before < 16
    kept = responses.read_bytes()[:before.good_bytes]
    with open(responses, "ab") as f:
        f.write(b'{"key": "08-Political_Lobbying/TYPO/3|ecso", "answer": "torn')
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "cut a torn last line" in done.stderr
    recs = lines(responses)
    keys = [r["key"] for r in recs]
    samples = [s["id"] for s in lines(out / "samples.jsonl")]
    assert len(samples) == 8 and sorted(keys) == sorted(f"{s}|{d}" for s in samples for d in ("none", "ecso"))
    assert len(keys) == len(set(keys)) == 16  # exactly once each
    assert responses.read_bytes().startswith(kept)  # nothing written before the kill was lost or rewritten
    assert all(r["status"] == "ok" and r["model_fingerprint"] and r["trace"] for r in recs)
    judged = lines(out / "judgments.jsonl")
    assert sorted(j["response_key"] for j in judged) == sorted(keys)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # a third run has nothing to do
    assert again.returncode == 0 and "0 answers written, 16 already there" in again.stderr
    assert len(lines(responses)) == 16 and len(lines(out / "judgments.jsonl")) == 16


# --- one run, both columns ------------------------------------------------------------------------------------
def test_both_defenses_share_step_one_and_match_an_undefended_run(demo_files, tmp_path):
    folder = write_vlsafe(tmp_path, n=2)
    both = run_eval(config(demo_files, "vlsafe", folder, tmp_path / "both"))
    assert both.generated == 4 and both.generation_errors == 0
    recs = {r["key"]: r for r in lines(tmp_path / "both" / "responses.jsonl")}
    none_only = run_eval(config(demo_files, "vlsafe", folder, tmp_path / "none", defenses=("none",)))
    plain = {r["key"]: r for r in lines(tmp_path / "none" / "responses.jsonl")}
    assert none_only.generated == 2
    for sid in ("1", "2"):
        ecso, derived = recs[f"{sid}|ecso"], recs[f"{sid}|none"]
        assert derived["answer"] == ecso["trace"]["initial_answer"] == plain[f"{sid}|none"]["answer"]
        assert derived["trace"]["derived_from"] == f"{sid}|ecso" and ecso["trace"]["steps"][0]["name"] == "answer"
        for field in ("model_fingerprint", "prompt_version", "decision_rule", "self_judge", "seed", "temperature"):
            assert ecso[field] is not None and ecso[field] == derived[field]


def test_missing_images_and_broken_rows_are_recorded_and_counted(demo_files, tmp_path):
    folder = write_vlsafe(tmp_path, n=4, missing=(2,), bad_lines=(0,))
    s = run_eval(config(demo_files, "vlsafe", folder, tmp_path / "run", judge=JudgeSpec("rule")))
    assert (s.n_samples, s.n_input_errors, s.generated, s.judged) == (4, 2, 8, 4)
    recs = {r["key"]: r for r in lines(tmp_path / "run" / "responses.jsonl")}
    assert recs["1|ecso"]["status"] == "input_error" and "malformed line 1" in recs["1|ecso"]["error"]
    assert recs["3|none"]["status"] == "input_error" and "missing image" in recs["3|none"]["error"]
    report = build_report(tmp_path / "run").data
    for c in [c for c in report["cells"] if c["category"] == "All"]:
        assert (c["n_samples"], c["n_judged"], c["n_unknown"]) == (4, 2, 2)
        assert c["unknown"] == {"input_error": 2}
    # the user adds the missing image: the next run answers that sample and nothing else
    from PIL import Image

    Image.new("RGB", (32, 24), (9, 9, 9)).save(tmp_path / "coco" / "train2017" / "000000051979.jpg")
    s = run_eval(config(demo_files, "vlsafe", folder, tmp_path / "run", judge=JudgeSpec("rule")))
    assert (s.n_input_errors, s.generated, s.reused, s.judged) == (1, 2, 6, 2)
    assert {r["key"]: r["status"] for r in lines(tmp_path / "run" / "responses.jsonl")}["3|ecso"] == "ok"


def test_failed_judge_calls_are_counted_then_retried_and_rejudging_keeps_the_answers(demo_files, tmp_path):
    folder = write_vlsafe(tmp_path, n=2)
    out = tmp_path / "run"
    run_eval(config(demo_files, "vlsafe", folder, out))  # the rule judge by default
    answers = (out / "responses.jsonl").read_bytes()
    state = {"up": False}
    with FakeJudgeServer(lambda body: "Rating: [[1]]" if state["up"] else (503, "down")) as srv:
        spec = JudgeSpec.parse(f"openai:{srv.url}", "gpt-4", retries=0)
        s = run_eval(config(demo_files, "vlsafe", folder, out, judge=spec))
        assert (s.generated, s.judged, s.judge_errors) == (0, 4, 4)
        cells = [c for c in build_report(out).data["cells"] if c["category"] == "All"]
        assert all(c["unknown"] == {"judge_error": 2} and c["harmless_rate"] == 0.0 for c in cells)
        state["up"] = True
        s = run_eval(config(demo_files, "vlsafe", folder, out, judge=spec))
        assert (s.judged, s.judge_errors) == (4, 0) and len(srv.requests) == 8
    assert (out / "responses.jsonl").read_bytes() == answers  # re-judging never regenerates
    report = build_report(out).data
    assert report["judge"].startswith("openai:gpt-4@") and len(report["judges_available"]) == 2
    assert all(c["harmless_rate"] == 100.0 and c["n_unknown"] == 0 for c in report["cells"])
    by_rule = build_report(out, judge=[j for j in report["judges_available"] if j.startswith("rule")][0]).data
    assert all(c["n_judged"] == c["n_samples"] for c in by_rule["cells"])
    with pytest.raises(InputError, match="has not judged this run"):
        build_report(out, judge="openai:nobody")


def test_local_gguf_judge_reads_the_run_with_the_benchmark_prompt(demo_files, tmp_path):
    """--judge llm without --judge-model: the demo model (with its projector: it sees images) judges each answer,
    each text query alone and each image + query pair."""
    from ecso.eval import judge_prompts as P
    from ecso.eval.judges import parse_vlsafe

    folder = write_vlsafe(tmp_path, n=1)
    s = run_eval(config(demo_files, "vlsafe", folder, tmp_path / "run", judge=JudgeSpec("llm", max_tokens=8),
                        leakage=True))
    assert s.judge.startswith("llm:SmolLM2") and (s.judged, s.judge_errors, s.leakage_judged) == (2, 0, 2)
    assert s.judge.endswith("+vision") and s.leakage_views == ("text", "pair")
    for j in lines(tmp_path / "run" / "judgments.jsonl"):
        assert j["prompt"] == "ecso/llm_binary_strict" and j["raw"].strip()
        assert (j["label"], j["score"], j["parse"]) == parse_vlsafe(j["raw"])
    text, pair = sorted(lines(tmp_path / "run" / "leakage.jsonl"), key=lambda x: x["view"], reverse=True)
    assert text["prompt"] == f"leakage/text/{P.LEAKAGE_PROMPT_VERSION}" and text["raw"].strip()
    assert pair["prompt"] == f"leakage/pair/{P.PAIR_PROMPT_VERSION}" and pair["saw"] == "image + query text"
