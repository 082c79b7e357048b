"""The papers' settings on real runs of the demo model: a preset's system prompt opens every ECSO step (seen in the
tokens llama.cpp evaluated), ECSO's released MME behaviour (step 4 with the image) under the MME preset, and a
VLSBench-preset run judged by a real local OpenAI-compatible server (`ecso serve` on the demo model) that is
reported as not the paper's judge in run.json, report.md and the side-by-side summary."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_cli
from support.benchmark_files import write_mme, write_vlsbench
from support.ecso_server import start_server
from support.observed import evaluated_per_step

from ecso.eval.generation import regenerate_with_image
from ecso.eval.paper_settings import LLAVA_V1_SYSTEM, VICUNA_V1_SYSTEM
from ecso.eval.report import write_summary
from ecso.eval.run_config import EvalConfig
from ecso.eval.samples import Sample
from ecso.runtime import EcsoOptions, EngineConfig, run
from ecso.runtime.prompts import gen_prompt

FAST = ("--ctx", "4096", "--no-progress")
SMALL = dict(max_tokens=12, caption_max_tokens=12, judge_max_tokens=4)
STEPS = ("answer", "judge", "caption", "regenerate")


def _evaluated_text(engine, fn):
    """Runs fn() with the engine's observer on: per ECSO step (from on_event), the text llama.cpp evaluated and
    the image positions it decoded."""
    result, seen = evaluated_per_step(engine, fn)
    return result, {k: (engine.detokenize(v["tokens"]), v["image_positions"]) for k, v in seen.items()}


def test_the_system_prompt_opens_every_ecso_step(demo_engine, street_png):
    """reuse=False: every step evaluates its whole prompt, so each step's system prompt is in what llama.cpp read."""
    query = "What is shown in this picture?"
    for system in (VICUNA_V1_SYSTEM, LLAVA_V1_SYSTEM):
        opts = EcsoOptions(judge="always-unsafe", reuse=False, system_prompt=system, **SMALL)
        r, text = _evaluated_text(demo_engine, lambda ev: run(demo_engine, street_png, query, opts, ev))
        assert [s.name for s in r.steps] == list(STEPS) and r.options["system_prompt"] == system
        for step in STEPS:
            assert system in text[step][0], step
    default, text = _evaluated_text(demo_engine, lambda ev: run(demo_engine, street_png, query, EcsoOptions(
        judge="always-unsafe", reuse=False, **SMALL), ev))
    for step in STEPS:  # None: the chat format's own default system prompt, in every step alike
        assert VICUNA_V1_SYSTEM not in text[step][0] and text[step][0].startswith(text["answer"][0][:40]), step


def test_step_4_with_the_image_reads_the_gen_prompt_and_the_image(demo_engine, street_png):
    """ECSO's released MME script: GEN(caption, query) again, in the same conversation, with the image."""
    opts = EcsoOptions(judge="always-unsafe", system_prompt=VICUNA_V1_SYSTEM, **SMALL)
    query = "Is there a street in the image?"
    result = run(demo_engine, str(street_png), query, opts)
    cfg = EvalConfig("mme", ".", ".", EngineConfig(model="m"), options=opts, regenerate_with_image=True)
    sample = Sample("existence/x/0", "mme", "existence", query, str(street_png))
    demo_engine.reset()  # nothing reused from the request's KV cache: the whole prompt is evaluated
    step, text = _evaluated_text(demo_engine, lambda ev: regenerate_with_image(demo_engine, cfg, sample, result))
    evaluated, image_positions = text[None]
    assert image_positions > 0  # the image was read again
    assert gen_prompt(result.caption, query) in evaluated and VICUNA_V1_SYSTEM in evaluated
    assert step["name"] == "regenerate_with_image" and step["generated_tokens"] <= SMALL["max_tokens"]


def test_mme_preset_records_step_4_with_the_image_and_ours_is_an_option(tmp_path):
    data = write_mme(tmp_path / "data")
    runs = {}
    for name, extra in (("paper", ()), ("ours", ("--regenerate-without-image",))):
        out = tmp_path / name
        r = run_cli("ecso", "eval", "mme", "--data", str(data), "--out", str(out), *FAST, "--limit", "1",
                    "--defense", "ecso", "--preset", "ecso-paper", "--self-judge", "always-unsafe", *extra)
        assert r.returncode == 0, r.stderr
        runs[name] = (json.loads((out / "run.json").read_text()), json.loads((out / "responses.jsonl").read_text()),
                      json.loads((out / "report.json").read_text()), r.stdout)
    run_info, rec, report, stdout = runs["paper"]
    assert run_info["generation"]["regenerate_with_image"] and run_info["preset"]["regenerate_with_image"]
    steps = rec["trace"]["steps"]
    assert [s["name"] for s in steps] == [*STEPS, "regenerate_with_image"]
    assert rec["answer"] == steps[-1]["text"].strip() and rec["trace"]["eyes_closed_answer"] == steps[3]["text"].strip()
    assert "step 4 with the image" in stdout
    # --self-judge always-unsafe is not the paper's self-judge: the settings say so
    assert report["settings"]["is_paper"] is False and any("always-unsafe judge" in d for d in
                                                           report["settings"]["differences"])
    ours_info, ours_rec, ours_report, _ = runs["ours"]
    assert not ours_info["generation"]["regenerate_with_image"]
    assert [s["name"] for s in ours_rec["trace"]["steps"]] == list(STEPS)
    assert any(d.startswith("step 4 (answer again): with the image in ECSO's release, without the image")
               for d in ours_report["settings"]["differences"])


def test_vlsbench_preset_with_a_local_ecso_server_as_judge_is_not_the_papers_judge(demo_engine, tmp_path):
    root = write_vlsbench(tmp_path / "vlsbench")
    out = tmp_path / "run"
    with start_server(demo_engine) as server:
        url = server.url
        host = url.split("//", 1)[1].split("/", 1)[0]
        r = run_cli("ecso", "eval", "vlsbench", "--data", str(root), "--out", str(out), *FAST, "--limit", "1",
                    "--preset", "vlsbench", "--judge", f"openai:{url}")
    assert r.returncode == 0, r.stderr
    run_info = json.loads((out / "run.json").read_text())
    details = run_info["judge_details"][run_info["judge"]]
    assert run_info["judge"] == f"openai:gpt-4o@{host}" and details["host"] == host
    assert details["model"] == "gpt-4o" and details["base_url"].startswith("http://127.0.0.1:")
    judgments = [json.loads(x) for x in (out / "judgments.jsonl").read_text().splitlines()]
    assert len(judgments) == 2 and {j["structured"] for j in judgments} == {"fallback"}  # ecso serve refuses it
    assert "the server refused response_format" in judgments[0]["structured_why"]
    report = json.loads((out / "report.json").read_text())
    assert report["judge_is_paper"] is False and report["paper_label"] == "**not the paper's judge**"
    md = (out / "report.md").read_text()
    assert "**Not the paper's judge**" in md and f"host {host}" in md and "structured output was not honoured" in md
    summary = write_summary([out], tmp_path / "summary", plot=False)
    assert "| **not the paper's judge** |" in summary.markdown
    assert "**Not the paper's judge**" in Path(summary.files["markdown"]).read_text()
