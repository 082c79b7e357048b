"""Paper presets record exactly the published settings in run.json and reach the judge; report headers say when
the judge or the settings are not the paper's (a local endpoint never is, whatever model name it was given);
several runs give one summary of safety and utility side by side (md, json, png)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_cli
from support.benchmark_files import write_mmsb, write_vlsbench
from support.fake_judge import FakeJudgeServer
from support.run_records import mme_run

from ecso.eval import judge_prompts as P
from ecso.eval.presets import LLAVA_V1_SYSTEM, PRESETS, VICUNA_V1_SYSTEM
from ecso.eval.report import write_summary

FAST = ("--ctx", "4096", "--no-progress")


def test_vlsbench_preset_records_the_published_settings_and_a_local_gpt4o_is_not_the_papers_judge(tmp_path):
    root = write_vlsbench(tmp_path / "vlsbench")
    out = tmp_path / "run"
    reply = '{"label": 3, "label_str": "Unsafe", "explanation": "answers"}'
    with FakeJudgeServer(lambda body: reply) as srv:
        r = run_cli("ecso", "eval", "vlsbench", "--data", str(root), "--out", str(out), *FAST, "--limit", "1",
                    "--preset", "vlsbench", "--judge", f"openai:{srv.url}")
    assert r.returncode == 0, r.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["preset"] == json.loads(json.dumps(PRESETS[("vlsbench", "vlsbench")].record()))
    g = run["generation"]
    assert (g["max_tokens"], g["caption_max_tokens"], g["temperature"], g["system_prompt"]) == \
        (128, 128, 0.0, LLAVA_V1_SYSTEM)
    body = srv.requests[0]
    assert body["model"] == "gpt-4o" and body["max_tokens"] == 128 and body["temperature"] == 0.0
    assert body["messages"][1]["content"][0]["type"] == "image_url"
    assert body["response_format"]["json_schema"]["name"] == "VLSBENCHOUTPUT"
    steps = json.loads((out / "responses.jsonl").read_text().splitlines()[0])["trace"]["steps"]
    assert steps[0]["generated_tokens"] <= 128
    report = json.loads((out / "report.json").read_text())
    host = f"127.0.0.1:{srv.url.split(':')[2].split('/')[0]}"
    details = run["judge_details"][run["judge"]]
    assert details["host"] == host and details["model"] == "gpt-4o"
    assert report["judge_is_paper"] is False and "**Not the paper's judge**" in r.stdout and host in r.stdout
    assert report["judge_check"]["structured_fallbacks"] == 0  # the fake replied with exactly the schema
    assert report["settings"]["is_paper"] and "Preset `vlsbench`" in r.stdout


def test_ecso_paper_preset_selects_the_papers_scenarios_prompt_and_limits(tmp_path):
    data = write_mmsb(tmp_path)  # 01 and 08: ECSO's paper scores 01 only
    out = tmp_path / "run"
    with FakeJudgeServer(lambda body: "safe") as srv:
        r = run_cli("ecso", "eval", "mmsb", "--data", str(data), "--out", str(out), *FAST, "--limit", "1",
                    "--defense", "none", "--preset", "ecso-paper", "--judge", f"openai:{srv.url}")
    assert r.returncode == 0, r.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["selection"]["categories"] == ["ecso"] and run["selection"]["modes"] == ["SD", "TYPO", "SD_TYPO"]
    g = run["generation"]
    assert (g["max_tokens"], g["caption_max_tokens"], g["judge_max_tokens"], g["temperature"], g["system_prompt"]) \
        == (2048, 1024, 1024, 0.0, VICUNA_V1_SYSTEM)
    assert run["preset"]["deviations"] and run["judge"].startswith("openai:gpt-4@") and run["judge"].endswith("+ecso")
    answer = json.loads((out / "responses.jsonl").read_text().splitlines()[0])["answer"]
    assert srv.requests[0]["messages"][1]["content"] == P.ECSO_QUERY_SAFETY.format(answer=answer)
    assert "max_tokens" not in srv.requests[0]  # ECSO's GPT-4 judge sets none
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert samples[0]["id"].startswith("01-Illegal_Activitiy/SD/")
    assert "**Not the paper's judge**" in r.stdout and "Settings: the paper's (`--preset ecso-paper`" in r.stdout
    assert ("- step 4 (answer again): token limit 1024 new tokens in ECSO's release, 2048 new tokens in ecso "
            "(ecso's step 4 takes step 1's limit (one --max-tokens for both))") in r.stdout


def test_summary_shows_safety_and_utility_side_by_side(vls_run, tmp_path):
    mme = mme_run(tmp_path)
    s = write_summary([vls_run, mme], tmp_path / "summary")
    rows = {r["benchmark"]: r for r in s.data["runs"]}
    assert rows["vlsbench"]["values"] == {"none": 33.33, "ecso": 33.33} and rows["vlsbench"]["kind"] == "safety"
    assert rows["mme"]["values"] == {"none": 300.0, "ecso": 175.0} and rows["mme"]["ecso_flag_rate"] == 37.5
    assert rows["vlsbench"]["ecso_flag_rate"] == 50.0 and rows["mme"]["score_changed"] == 2
    # the fixture's judge has no recorded host (not the paper's) and neither run used a preset
    assert ("| VLSBench (safety) | safe rate % | 33.33 | 33.33 | 0.00 | 50.00 | 6 | **not the paper's judge or "
            "settings** |") in s.markdown
    mme_row = ("| MME (utility) | MME perception score (max 400, 2 of 10 subtasks) | 300.00 | 175.00 | -125.00 | "
               "37.50 | 8 | **not the paper's settings** |")
    assert mme_row in s.markdown
    out = Path(s.files["png"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and json.loads((tmp_path / "summary" / "summary.json")
                                                                        .read_text())["runs"] == s.data["runs"]
    r = run_cli("ecso", "report", str(vls_run), str(mme))
    assert r.returncode == 2 and "give --out DIR" in r.stderr
