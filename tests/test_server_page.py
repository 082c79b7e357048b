"""The page at `/`, in a real headless Chromium (Debian's `chromium`, driven over the DevTools pipe): submit the
example image with a question, wait for the answer, screenshot it, and check the DOM shows the four steps with
their timings, the verdict, the judge reply, the caption and a retraction when guarded streaming fires."""

from __future__ import annotations

import json

import pytest

from ecso.runtime import EcsoOptions
from ecso.server import EcsoServer, ServerConfig
from support.browser import Browser, find_chromium
from support.reliability import request

pytestmark = pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (.ci/run installs it)")

STEPS = """JSON.stringify([...document.querySelectorAll('#steps li')].map(li => ({
    step: li.dataset.step, state: li.dataset.state, secs: li.querySelector('.secs').textContent,
    detail: li.querySelector('.detail').textContent})))"""


@pytest.fixture(scope="module")
def server(demo_files):
    from ecso.runtime import Engine, EngineConfig

    with Engine(EngineConfig(model=demo_files[0], mmproj=demo_files[1], n_ctx=2048, n_threads=1)) as engine:
        with EcsoServer(engine, EcsoOptions(max_tokens=16), ServerConfig(port=0, model_name="demo",
                                                                           log=False)).start() as s:
            yield s


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    with Browser(tmp_path_factory.mktemp("chromium-profile")) as browser:
        yield browser.open(f"http://127.0.0.1:{server.port}/")


def _ask(page, question: str, unsafe: bool, guard_every: int = 0) -> dict:
    page.eval(f"document.querySelector('#question').value = {json.dumps(question)}")
    page.eval(f"document.querySelector('#force-unsafe').checked = {json.dumps(unsafe)}")
    page.eval(f"document.querySelector('#guard').value = '{guard_every}'")
    page.eval("document.querySelector('#max-tokens').value = '12'")
    page.eval("document.querySelector('#ask').click()")
    page.wait_for("document.body.dataset.state === 'running'", 10)
    page.wait_for("document.body.dataset.state !== 'running'", 300)
    return {"state": page.eval("document.body.dataset.state"), "steps": json.loads(page.eval(STEPS)),
            **{k: page.eval(f"document.querySelector('#{k}').textContent") for k in
               ("verdict", "judge-reply", "caption", "answer", "error", "total", "retracted-note")}}


def test_page_is_self_contained_and_locked_down(server):
    r = request(server.port, "GET", "/")
    html = r.body.decode()
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    assert "http://" not in html and "https://" not in html and "src=\"/" not in html  # no external assets


def test_page_shows_the_four_steps_live_for_the_example_image(page, street_png, tmp_path):
    page.set_files("#image", [str(street_png)])
    page.wait_for("document.querySelector('#drop img')", 10)
    shown = _ask(page, "What is happening in this picture?", unsafe=True)
    page.screenshot(tmp_path / "ecso-page.png")
    assert (tmp_path / "ecso-page.png").stat().st_size > 10_000
    assert shown["state"] == "done" and not shown["error"], shown
    steps = {s["step"]: s for s in shown["steps"]}
    assert [s["state"] for s in shown["steps"]] == ["done"] * 4, shown["steps"]
    for s in steps.values():
        assert s["secs"].endswith(" s") and float(s["secs"][:-2]) >= 0
    assert "image encoded" in steps["answer"]["detail"] or "reused" in steps["answer"]["detail"]
    assert shown["verdict"].startswith("unsafe") and shown["judge-reply"] == '"yes"'
    assert shown["caption"] not in ("", "–") and shown["answer"].strip()
    assert "unsafe" in shown["retracted-note"]


def test_page_shows_a_safe_verdict_and_skips_steps_three_and_four(page, tmp_path):
    shown = _ask(page, "Name a fruit.", unsafe=False)
    page.screenshot(tmp_path / "ecso-page-safe.png")
    assert shown["state"] == "done" and not shown["error"], shown
    assert [s["state"] for s in shown["steps"]] == ["done", "done", "skipped", "skipped"], shown["steps"]
    assert shown["judge-reply"] not in ("", "–") and shown["answer"].strip()
    assert shown["verdict"].startswith("safe" if "yes" not in shown["judge-reply"].lower() else "unsafe")


def test_page_shows_the_retraction_when_guarded_streaming_fires(page, tmp_path):
    shown = _ask(page, "Describe a busy street in detail.", unsafe=True, guard_every=2)
    page.screenshot(tmp_path / "ecso-page-retracted.png")
    assert shown["state"] == "done" and not shown["error"], shown
    assert shown["retracted-note"].startswith("Retracted") and shown["judge-reply"].startswith("the guard"), shown
    states = {s["step"]: s["state"] for s in shown["steps"]}
    assert states["answer"] == "done" and states["judge"] == "skipped" and states["regenerate"] == "done"
