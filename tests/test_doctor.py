"""`ecso doctor`: a bug report's facts from the libraries themselves, and a smoke run whose crash is contained."""

from __future__ import annotations

import json
import subprocess
import sys

import llama_cpp

from ecso.runtime.llama_settings import choose_cpu_repack, llama_system_info
from ecso.cli.system import run_smoke_child


def test_doctor_json_reports_versions_backends_features_and_a_passing_smoke_run():
    p = subprocess.run([sys.executable, "-m", "ecso.cli.main", "doctor", "--json"], capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout)
    assert r["versions"]["llama-cpp-python"] == llama_cpp.__version__
    assert r["versions"]["ggml_version"] and r["versions"]["ggml_commit"]
    assert "CPU" in r["backends"]
    assert any(d["type"] == "cpu" for d in r["devices"])
    assert r["gpu_offload"] is bool(llama_cpp.llama_supports_gpu_offload())
    feats = llama_system_info()
    assert r["llama_features"] == feats
    assert r["cpu_repack"]["enabled"] is choose_cpu_repack("auto", feats).enabled
    assert "CPUExecutionProvider" in r["onnxruntime"]["providers"]
    assert r["demo_model"]["installed"] is True
    smoke = r["smoke"]
    assert smoke["ok"], smoke
    assert smoke["detail"]["steps"][:2] == ["answer", "judge"] and smoke["detail"]["image_encodes"] == 1


def test_a_native_crash_in_the_smoke_child_becomes_a_message_with_what_to_try():
    crash = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    s = run_smoke_child(crash, "auto", timeout=60)
    assert not s.ok and s.returncode == -11
    assert s.message == "the engine crashed with SIGSEGV; try --cpu-repack off"
    s = run_smoke_child(crash, "off", timeout=60)
    assert s.message == "the engine crashed with SIGSEGV"


def test_a_python_error_in_the_smoke_child_is_reported_by_its_last_line():
    s = run_smoke_child("raise SystemExit('ecso: error: model file not found: x.gguf')", "auto", timeout=60)
    assert not s.ok and s.returncode == 1 and "model file not found" in s.message
