"""`ecso-run` and `ecso` as a user runs them: installed console scripts, real demo model."""

from __future__ import annotations

import json

from conftest import EXAMPLES, run_cli

STREET = str(EXAMPLES / "street.png")


def test_ecso_run_answers_with_the_demo_model():
    r = run_cli("ecso-run", "--image", STREET, "--max-tokens", "24", "What is happening in this picture?")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "Traceback" not in r.stderr


def test_json_output_carries_every_step_and_the_provenance():
    r = run_cli("ecso-run", "--image", STREET, "--max-tokens", "16", "--judge", "logit", "--threshold", "0",
                "--json", "Describe the image.")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["unsafe"] is True and [s["name"] for s in d["steps"]] == ["answer", "judge", "caption", "regenerate"]
    assert d["image_encodes"] == 1 and d["prompt_version"] and d["decision_rule"] == "exact"
    assert d["engine"]["model_fingerprint"] and d["options"]["judge"] == "logit"


def test_query_from_stdin_and_verbose_step_trace():
    r = run_cli("ecso-run", "--image", STREET, "--max-tokens", "8", "-v", "-", input="What colour is the car?\n")
    assert r.returncode == 0, r.stderr
    assert "[ecso]   answer" in r.stderr and "[ecso]   judge" in r.stderr


def test_no_reuse_flag_gives_the_same_answer():
    args = ("--image", STREET, "--max-tokens", "12", "Describe the image.")
    a = run_cli("ecso-run", *args)
    b = run_cli("ecso-run", "--no-reuse", *args)
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout


def _one_line_error(r, code, text):
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ecso: error:") and text in lines[0], r.stderr


def test_bad_inputs_exit_with_one_line(tmp_path, tiny):
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is text, not a picture")
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"\x00" * 1000)
    _one_line_error(run_cli("ecso-run", "--image", str(tmp_path / "missing.png"), "hi"), 2, "image not found")
    _one_line_error(run_cli("ecso-run", "--image", str(not_image), "hi"), 2, "not an image")
    _one_line_error(run_cli("ecso-run", "--image", STREET, "   "), 2, "query is empty")
    _one_line_error(run_cli("ecso-run", "--model", str(not_gguf), "hi"), 3, "not a GGUF file")
    _one_line_error(run_cli("ecso-run", "--model", "no-such-model", "hi"), 2, "unknown model")
    _one_line_error(run_cli("ecso-run", "--mmproj", str(tiny.mmproj), "--image", STREET, "hi"), 3,
                    "belongs to another model")
    _one_line_error(run_cli("ecso-run", "--ctx", "512", "--image", STREET, "why " * 600), 2, "more than the context")


def test_help_explains_the_commands():
    r = run_cli("ecso-run", "--help")
    assert r.returncode == 0 and "--judge" in r.stdout and "demo model" in r.stdout
    r = run_cli("ecso", "--help")
    assert r.returncode == 0 and all(c in r.stdout for c in ("run", "export", "models", "bench"))
    r = run_cli("ecso", "models")
    assert r.returncode == 0 and "demo" in r.stdout and "ready" in r.stdout
