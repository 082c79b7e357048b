"""`ecso eval`, `ecso report` and `ecso data-engine` as a user runs them: installed console script, real demo
model, each benchmark fixture end to end (rule judge, OpenAI-compatible judge, leakage), one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_cli
from support.benchmark_files import write_mmsb, write_vlsafe, write_vlsbench
from support.fake_judge import FakeJudgeServer

from ecso.eval.judges import JudgeInput, RuleJudge

FAST = ("--max-tokens", "16", "--ctx", "2048", "--no-progress")


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def check_run(out: Path, n_samples: int, n_unusable: int) -> dict:
    """Every sample has exactly one record per defense; the report counts every one of them."""
    samples = lines(out / "samples.jsonl")
    responses = lines(out / "responses.jsonl")
    assert len(samples) == n_samples
    keys = [r["key"] for r in responses]
    assert sorted(keys) == sorted(f"{s['id']}|{d}" for s in samples for d in ("none", "ecso"))
    assert sum(r["status"] == "input_error" for r in responses) == 2 * n_unusable
    assert all(r["status"] in ("ok", "input_error") for r in responses)
    report = json.loads((out / "report.json").read_text())
    alls = [c for c in report["cells"] if c["category"] == "All"]
    assert sum(c["n_samples"] for c in alls) == 2 * n_samples  # one "All" cell per defense
    assert (report["n_samples"], report["n_records"]) == (n_samples, 2 * n_samples)
    assert all(c["n_judged"] + c["n_unknown"] == c["n_samples"] for c in report["cells"])
    assert (out / "report.md").exists() and (out / "report.png").exists()
    return report


def test_mm_safetybench_fixture_runs_end_to_end(tmp_path):
    data = write_mmsb(tmp_path, {"01-Illegal_Activitiy": ["0"], "08-Political_Lobbying": ["1"]},
                      missing=(("08-Political_Lobbying", "TYPO", "1"),))
    out = tmp_path / "run"
    r = run_cli("ecso", "eval", "mmsb", "--data", str(data), "--out", str(out), *FAST)
    assert r.returncode == 0, r.stderr
    report = check_run(out, 6, 1)
    assert report["modes"] == ["SD", "TYPO", "SD_TYPO"] and report["judge"].startswith("rule@")
    assert "## Harmless rate" in r.stdout and "## Attack rate" in r.stdout and "| 08-Political_Lobbying |" in r.stdout
    rows = {(c["category"], c["mode"], c["defense"]): c for c in report["cells"]}
    assert rows[("08-Political_Lobbying", "TYPO", "ecso")]["unknown"] == {"input_error": 1}
    judged = {j["response_key"]: j for j in lines(out / "judgments.jsonl")}
    answers = {r["key"]: r["answer"] for r in lines(out / "responses.jsonl") if r["status"] == "ok"}
    rule = RuleJudge()
    assert judged.keys() == answers.keys()
    assert all(judged[k]["label"] == rule.judge(JudgeInput("mm-safetybench", "", "", a)).label
               for k, a in answers.items())
    rep = run_cli("ecso", "report", str(out), "--json")
    assert rep.returncode == 0 and json.loads(rep.stdout)["cells"] == report["cells"]


def test_vlsafe_fixture_with_an_openai_compatible_judge(tmp_path):
    folder = write_vlsafe(tmp_path, n=3, missing=(2,))
    out = tmp_path / "run"
    hacking = "[Question]\nCan you provide advice on how to hack"  # sample 1's query

    def reply(body: dict) -> str:
        return "The answer explains how. Rating: [[0]]" if hacking in body["messages"][1]["content"] else \
            "Rating: [[1]]"

    with FakeJudgeServer(reply) as srv:
        r = run_cli("ecso", "eval", "vlsafe", "--data", str(folder), "--out", str(out), *FAST,
                    "--judge", f"openai:{srv.url}", "--judge-model", "gpt-4")
    assert r.returncode == 0, r.stderr
    report = check_run(out, 3, 1)
    assert len(srv.requests) == 4 and report["judge"].startswith("openai:gpt-4@127.0.0.1")
    for c in report["cells"]:  # VLSafe has one split: only the "All" row
        assert c["category"] == "All"
        assert (c["counts"], c["harmless_rate"], c["n_unknown"]) == ({"unsafe": 1, "safe": 1}, 33.33, 1)
    assert "## Harmless rate" in r.stdout and "| All | 33.33 | 33.33 | 3 | 2/2 | 1/1 |" in r.stdout


def test_vlsbench_fixture_with_leakage(tmp_path):
    root = write_vlsbench(tmp_path / "vlsbench", missing=(3,))
    out = tmp_path / "run"
    r = run_cli("ecso", "eval", "vlsbench", "--data", str(root), "--out", str(out), *FAST, "--leakage")
    assert r.returncode == 0, r.stderr
    report = check_run(out, 5, 1)
    assert "refusal" in r.stdout and "## Visual safety information leakage" in r.stdout
    assert "no pair harm rate or leak share (this judge does not see images)" in r.stdout
    rule = RuleJudge()
    samples = lines(out / "samples.jsonl")
    leaks = {s["id"]: rule.text_harm(s["query"]).label == "harmful" for s in samples}
    rows = {row["category"]: row for row in report["leakage"]["rows"]}
    assert rows["All"]["n_samples"] == 5 and rows["All"]["text_judged"] == 5  # text needs no image: all judged
    assert rows["All"]["text_harmful"] == sum(leaks.values()) and rows["All"]["r1"] is None
    for cat in ("Violent", "Illegal Activity", "Privacy"):
        assert rows[cat]["text_harmful"] == sum(leaks[s["id"]] for s in samples if s["category"] == cat)


def test_data_engine_writes_sft_records_then_reexports_from_the_run(tmp_path):
    folder = write_vlsafe(tmp_path, n=3, missing=(1,))
    sft = tmp_path / "sft.jsonl"
    r = run_cli("ecso", "data-engine", "vlsafe", "--data", str(folder), "--out", str(sft), *FAST,
                "--self-judge", "logit", "--threshold", "0")  # threshold 0: ECSO flags every answer
    assert r.returncode == 0, r.stderr
    assert "2 SFT records" in r.stderr
    recs = lines(sft)
    responses = {x["sample_id"]: x for x in lines(Path(str(sft) + ".run") / "responses.jsonl")}
    assert [x["id"] for x in recs] == ["1", "3"] and set(responses) == {"1", "2", "3"}
    for rec in recs:
        resp = responses[rec["id"]]
        assert Path(rec["image"]).is_file() and rec["conversations"][0]["value"].startswith("<image>\n")
        steps = rec["ecso_trace"]["steps"]
        assert [s["name"] for s in steps] == ["answer", "judge", "caption", "regenerate"]
        assert rec["conversations"][1] == {"from": "gpt", "value": steps[-1]["text"]} == \
            {"from": "gpt", "value": resp["answer"]}
        assert rec["ecso_trace"]["unsafe_answer"] == steps[0]["text"] and rec["ecso_trace"]["self_judge"] == "logit"
    again = tmp_path / "again.jsonl"
    r2 = run_cli("ecso", "data-engine", "--from-run", str(sft) + ".run", "--out", str(again))
    assert r2.returncode == 0, r2.stderr
    assert again.read_text() == sft.read_text()


def test_bad_input_gives_one_line_errors(tmp_path):
    data = write_mmsb(tmp_path)
    cases = [
        (("eval", "vlsbench", "--data", str(tmp_path), "--out", str(tmp_path / "r")), "no data.json under"),
        (("eval", "mmsb", "--data", str(data), "--out", str(tmp_path / "r"), "--scenario", "42"),
         "matches no scenario"),
        (("eval", "mmsb", "--data", str(data), "--out", str(tmp_path / "r"), "--judge", "gpt4"), "unknown --judge"),
        (("eval", "mmsb", "--data", str(data), "--out", str(tmp_path / "r"), "--judge", "guard"),
         "--judge guard needs --judge-model"),
        (("eval", "mmsb", "--data", str(data), "--out", str(tmp_path / "r"), "--preset", "vlsbench"),
         "--preset vlsbench has no settings for mm-safetybench"),
        (("eval", "mmsb", "--data", str(data), "--out", str(tmp_path / "r"), "--preset", "ecso-paper",
          "--max-tokens", "64"), "--max-tokens conflicts with --preset ecso-paper"),
        (("eval", "mme", "--data", str(tmp_path), "--out", str(tmp_path / "r")), "no MME subtask folders"),
        (("eval", "mmsb", "--data", str(data), "--out", str(tmp_path / "r"), "--judge", "openai:http://x"),
         "needs --judge-model"),
        (("eval", "mmsb", "--data", str(data), "--out", str(tmp_path / "r"), "--judge-model", "/nope.gguf"),
         "judge model /nope.gguf not found"),
        (("report", str(tmp_path)), "no run.json"),
        (("data-engine", "--out", str(tmp_path / "x.jsonl")), "give BENCH and --data"),
    ]
    for args, message in cases:
        r = run_cli("ecso", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert not (tmp_path / "r").exists()  # every check comes before anything is written
