"""`ecso eval --backend URL --parallel 4` on llama.cpp's own `llama-server -np 4`: the server killed and restarted
in the middle of a run loses and doubles nothing (in-flight steps are retried, or recorded as errors and generated
again by --retry-errors), and the report has the same shape as an in-process run's."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from support.benchmark_files import write_mmsb
from support.killed_eval import eval_command
from support.llama_server import LlamaServer

from ecso.eval.report import build_report


def records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture()
def server(demo_files, tmp_path):
    s = LlamaServer(demo_files[0], demo_files[1], slots=4, n_ctx=2048, extra=("-fa", "off"),
                    log_path=tmp_path / "server.log")
    yield s.start()
    s.stop()


def remote_eval(data: Path, out: Path, server: LlamaServer, *extra: str) -> list[str]:
    return eval_command(data, out, "--backend", server.url, "--backend-model", "demo", "--parallel", "4", *extra)


def wait_for_records(responses: Path, n: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not (responses.exists() and responses.read_bytes().count(b"\n") >= n):
        assert proc.poll() is None, "the eval ended before the server could be killed: " + proc.stderr.read()[-800:]
        assert time.time() < deadline
        time.sleep(0.05)


def test_eval_survives_the_server_restarting_mid_run_with_nothing_lost_or_doubled(server, tmp_path):
    data = write_mmsb(tmp_path)  # 4 questions x SD/TYPO = 8 samples, x 2 defenses = 16 records
    out = tmp_path / "run"
    responses = out / "responses.jsonl"
    proc = subprocess.Popen(remote_eval(data, out, server, "--backend-retries", "6"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_records(responses, 2, proc)
    server.kill()  # requests in flight are cut; the client backs off and retries
    time.sleep(1.0)
    server.start()
    assert proc.wait(600) == 0, proc.stderr.read()[-800:]
    recs = records(responses)
    keys = [r["key"] for r in recs]
    assert len(keys) == len(set(keys)) == 16  # nothing doubled, nothing lost
    assert all(r["status"] == "ok" for r in recs), [r["error"] for r in recs if r["status"] != "ok"]


def test_eval_records_errors_while_the_server_is_down_and_resumes_them(server, tmp_path, demo_files):
    data = write_mmsb(tmp_path)
    out = tmp_path / "run"
    responses = out / "responses.jsonl"
    proc = subprocess.Popen(remote_eval(data, out, server, "--backend-retries", "0"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_records(responses, 2, proc)
    server.kill()  # no retries: what was in flight and everything after fails and is recorded as an error
    assert proc.wait(600) == 0, proc.stderr.read()[-800:]
    first = {r["key"]: r for r in records(responses)}
    failed = [k for k, r in first.items() if r["status"] == "error"]
    assert len(first) == 16 and failed and all("cannot reach the backend" in first[k]["error"] for k in failed)
    server.start()
    done = subprocess.run(remote_eval(data, out, server, "--retry-errors"), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-800:]
    latest = {}
    for r in records(responses):
        latest[r["key"]] = r
    ok_per_key = {}
    for r in records(responses):
        ok_per_key[r["key"]] = ok_per_key.get(r["key"], 0) + (r["status"] == "ok")
    assert len(latest) == 16 and all(r["status"] == "ok" for r in latest.values())
    assert set(ok_per_key.values()) == {1}  # each answer written once; the errors were replaced, not doubled
    # the report is built as for an in-process run: both defenses, every sample accounted for, no generation
    # error left unknown
    cells = [c for c in build_report(out).data["cells"] if c["category"] == "All"]
    assert {c["defense"] for c in cells} == {"none", "ecso"}
    unknown = [c["unknown"] for c in cells]
    assert all(c["n_samples"] > 0 for c in cells)
    assert not any(u.get("generation_error") or u.get("not_generated") or u.get("not_judged") for u in unknown), unknown
