"""`ecso eval --parallel 4` on the real demo model: killed with SIGKILL and restarted, it loses and doubles
nothing, and its records agree with a sequential run of the same samples (batched kernels may round differently:
the agreement is measured and reported, verdicts and texts are compared record by record)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from support.benchmark_files import write_mmsb
from support.killed_eval import eval_command, kill_after_records

from ecso.eval import store
from ecso.eval.runner import EvalConfig, run_eval
from ecso.runtime import EcsoOptions, EngineConfig


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_parallel_eval_survives_sigkill_and_agrees_with_a_sequential_run(demo_files, tmp_path):
    data = write_mmsb(tmp_path, {"01-Illegal_Activitiy": ["0", "1"], "08-Political_Lobbying": ["0", "3"]})
    out = tmp_path / "par"
    cmd = eval_command(data, out, "--parallel", "4", "--judge", "none")
    responses = out / "responses.jsonl"
    kill_after_records(cmd, responses, 2, timeout=300)
    before = store.read_log(responses)
    assert 2 <= len(before.records) < 16
    kept = responses.read_bytes()[:before.good_bytes]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    recs = lines(responses)
    keys = [r["key"] for r in recs]
    samples = [s["id"] for s in lines(out / "samples.jsonl")]
    assert len(keys) == len(set(keys)) == 16  # every (sample, defense) exactly once
    assert sorted(keys) == sorted(f"{s}|{d}" for s in samples for d in ("none", "ecso"))
    assert responses.read_bytes().startswith(kept)
    assert all(r["status"] == "ok" and r["trace"]["engine"]["parallel"] == 4 for r in recs if r["defense"] == "ecso")

    seq = run_eval(EvalConfig("mmsb", str(data), str(tmp_path / "seq"),
                              EngineConfig(model=demo_files[0], mmproj=demo_files[1], n_ctx=2048),
                              EcsoOptions(max_tokens=16, caption_max_tokens=16), modes=("SD", "TYPO"),
                              progress=False))
    assert seq.generated == 16
    ref = {r["key"]: r for r in lines(tmp_path / "seq" / "responses.jsonl")}
    par = {r["key"]: r for r in recs}
    assert set(ref) == set(par)
    ecso_keys = [k for k in ref if k.endswith("|ecso")]
    verdicts = sum(ref[k]["ecso_flagged"] == par[k]["ecso_flagged"] for k in ecso_keys) / len(ecso_keys)
    texts = sum(ref[k]["answer"] == par[k]["answer"] for k in ref) / len(ref)
    print(f"parallel 4 vs sequential on the demo model: verdicts {verdicts:.0%}, texts {texts:.0%} identical")
    # measured on this fixture (docs/engine.md): verdicts 100%; texts differ where a near-tie flips a greedy token
    assert verdicts >= 0.75 and texts >= 0.25
