"""The scripts in examples/ run, on the real demo model: the embedded desktop assistant (events, cancel button),
the OpenAI client against a real `ecso serve`, the offline evaluation."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

import ecso
from conftest import EXAMPLES, REPO

STREET = str(EXAMPLES / "street.png")


def run_example(name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs an example as a user would: `python examples/NAME ...` from the repo root."""
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env=dict(os.environ))


def import_example(name: str):
    """An example script as a module (registered, as dataclasses need), imported once."""
    key = f"example_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


@pytest.fixture(scope="module")
def demo_model():
    with ecso.load("demo", max_tokens=12, caption_max_tokens=12, n_ctx=2048) as model:
        yield model


# --- desktop assistant --------------------------------------------------------------------------------------------
def test_assistant_callback_receives_step_and_token_events(demo_model):
    app = import_example("desktop_assistant")
    events = []
    assistant = app.Assistant(demo_model, events.append)
    assistant.ask(STREET, "What is happening in this picture?", judge="always-unsafe")
    outcome = assistant.wait(300)
    assert outcome.result is not None and not outcome.cancelled and outcome.error is None
    starts = [e.step for e in events if e.kind == "step_start"]
    assert starts == ["answer", "judge", "caption", "regenerate"]
    tokens = [e for e in events if e.kind == "token"]
    assert tokens and {e.step for e in tokens} == {"answer", "regenerate"} and outcome.tokens == len(tokens)
    assert "".join(e.text for e in tokens if e.step == "regenerate").strip() == outcome.result.answer
    assert events[-1].kind == "result" and events[-1].result is outcome.result


def test_cancel_button_stops_a_request_and_the_model_stays_usable(demo_model):
    app = import_example("desktop_assistant")
    question = "What is happening in this picture?"
    reference = demo_model.run(STREET, question).answer
    seen = threading.Event()
    count = [0]

    def on_event(ev):
        if ev.kind == "token":
            count[0] += 1
            if count[0] == 3:
                seen.set()

    assistant = app.Assistant(demo_model, on_event)
    button = threading.Thread(target=lambda: (seen.wait(120), assistant.cancel()))  # pressed from another thread
    button.start()
    t0 = time.perf_counter()
    assistant.ask(STREET, "Write a long story about this picture.", max_tokens=400)
    outcome = assistant.wait(300)
    button.join()
    assert outcome.cancelled and outcome.result is None and outcome.error is None
    assert 3 <= outcome.tokens < 400 and not assistant.busy
    assert time.perf_counter() - t0 < 120  # stopped, not run to 400 tokens and thrown away
    # the engine is free and its KV bookkeeping intact: the same question gives the same greedy answer
    assistant = app.Assistant(demo_model, lambda ev: None)
    assistant.ask(STREET, question)
    again = assistant.wait(300)
    assert again.result is not None and again.result.answer == reference


def test_assistant_reports_bad_input_as_one_line(demo_model, tmp_path):
    app = import_example("desktop_assistant")
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    assistant = app.Assistant(demo_model, lambda ev: None)
    assistant.ask(str(bad), "What is this?")
    outcome = assistant.wait(60)
    assert outcome.result is None and "not an image" in outcome.error


def test_desktop_assistant_script_runs_its_session():
    r = run_example("desktop_assistant.py", "--max-tokens", "8", "--cancel-after", "3")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "[caption]" in out and "[regenerate]" in out and "cancelled after 3 tokens" in out
    assert out.rstrip().endswith("still usable after cancel")


# --- OpenAI client against `ecso serve` -------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_demo():
    """`ecso serve` on the demo model, in its own process on a free loopback port; stopped after the tests."""
    port = free_port()
    proc = subprocess.Popen(["ecso", "serve", "--port", str(port), "--quiet", "--max-tokens", "16"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"ecso serve did not come up: {proc.stdout.read() if proc.poll() else ''}")
            time.sleep(0.5)
        yield f"{url}/v1"
    finally:
        proc.terminate()
        proc.wait(30)


def test_openai_client_example_against_ecso_serve(served_demo):
    r = run_example("openai_client.py", "--base-url", served_demo, "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    verdicts = [ln for ln in lines if ln.startswith("  => ")]
    assert len(verdicts) == 3, r.stdout
    assert verdicts[0].startswith("  => safe; judge paper") or verdicts[0].startswith("  => UNSAFE")
    assert "judge always-unsafe" in verdicts[1] and "steps answer -> judge -> caption -> regenerate" in verdicts[1]
    assert "content chunk" in verdicts[2] and not verdicts[2].startswith("  => 0 ")


# --- offline evaluation -------------------------------------------------------------------------------------------
def test_offline_eval_example_writes_a_report_and_resumes(tmp_path):
    out = tmp_path / "run"
    r = run_example("offline_eval.py", "--out", str(out), "--max-tokens", "8", "--self-judge", "always-unsafe")
    assert r.returncode == 0, r.stderr
    assert "3 samples: 6 answers written now, 0 already there, 0 errors; ECSO flagged 3" in r.stdout
    assert "## Harmless rate" in r.stdout and (out / "report.md").exists()
    records = [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()]
    assert sorted(x["defense"] for x in records) == ["ecso"] * 3 + ["none"] * 3
    assert all(x["ecso_flagged"] for x in records if x["defense"] == "ecso")
    again = run_example("offline_eval.py", "--out", str(out), "--max-tokens", "8", "--self-judge", "always-unsafe")
    assert again.returncode == 0 and "0 answers written now, 6 already there" in again.stdout, again.stderr
