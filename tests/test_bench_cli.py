"""`ecso bench` end to end on the tiny LLaVA: one command measures every ratio side by side and writes them as JSON.
No timing is asserted (speed is for the benchmark, not the tests); what is asserted is that every ratio was measured,
that the work counted is the work ECSO does, and that the engines compared gave the same answers."""

from __future__ import annotations

import json
import math

from conftest import run_cli


def test_ecso_bench_measures_every_ratio_and_the_native_engine_in_one_run(tiny, libecso, tmp_path):
    out = tmp_path / "bench.json"
    r = run_cli("ecso", "bench", "-m", str(tiny.llm), "--mmproj", str(tiny.mmproj), "--ctx", "1024", "--repeats", "2",
                "--max-tokens", "6", "--json", str(out), "--native-lib", str(libecso), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert set(rep["ratios"]) == set(rep["targets"]) and len(rep["ratios"]) == 6
    assert all(math.isfinite(v) and v > 0 for v in rep["ratios"].values())
    # reuse encodes the image once for all four steps; the naive way once per step that sees it
    assert rep["image_encodes_per_request"] == {"full reuse": 1, "full no-reuse": 3}
    native = rep["native"]
    assert set(native["ratios"]) == {"request native/python", "decode tok/s native/python", "decode tok/s native/Llama"}
    assert all(math.isfinite(v) and v > 0 for v in native["ratios"].values())
    assert not [n for n in native["notes"] if "differ" in n], native["notes"]
    assert "native/python" in r.stdout and "full reuse/no-reuse" in r.stdout
