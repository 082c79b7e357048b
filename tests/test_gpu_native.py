"""The native engine on the device: libecso built with the project's CMake against the GPU build of llama.cpp that
this interpreter imports, then the conformance tests (tests/test_native_conformance.py) run here, where both the
Python engine and libecso offload every layer and the projector.

The libecso of the CPU tests lives in build/; this one in build/gpu-<key> (key: the llama_cpp package folder), so
neither build overwrites the other. A subset of the conformance tests keeps lavapipe's wall time short: every step
kind and reuse against no reuse on the tiny LLaVA; the same on the demo model is marked gpu_demo (minutes on
lavapipe: outside `.ci/gpu-tier --quick`).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import test_native_conformance as conformance
from support.gpu import require_gpu
from test_native_conformance import test_tiny_llava_steps_match_python  # noqa: F401

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def device():
    return require_gpu()


@pytest.fixture(scope="session")
def libecso(device) -> Path:
    """libecso built against this interpreter's llama_cpp (the GPU build), in a build folder of its own."""
    import llama_cpp

    key = hashlib.sha256(str(Path(llama_cpp.__file__).resolve().parent).encode()).hexdigest()[:10]
    build = REPO / "build" / f"gpu-{key}"
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2"))
    for cmd in (["cmake", "-S", str(REPO), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DPython3_EXECUTABLE={sys.executable}"],
                ["cmake", "--build", str(build), "--target", "ecso"]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if r.returncode != 0:
            pytest.fail(f"building libecso failed ({' '.join(cmd)}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    cache = (build / "CMakeCache.txt").read_text()
    assert str(Path(llama_cpp.__file__).resolve().parent.parent) in cache  # linked against this llama_cpp
    from ecso.runtime.libecso import library_name

    return build / library_name()


def test_native_engine_offloads_every_layer_on_the_device(libecso, demo_files, street_png):
    from ecso.runtime import EcsoOptions, EngineConfig
    from ecso.runtime.libecso import NativeEngine

    with NativeEngine(EngineConfig(model=demo_files[0], mmproj=demo_files[1], n_ctx=2048), libecso) as native:
        r = native.run(street_png, "What is it?", EcsoOptions(max_tokens=4, defense=False))
    assert native_offloads_everything(r)


def test_native_reuse_on_the_device_is_bit_exact_on_the_tiny_llava(libecso, tiny, street_png):
    """Reuse against no reuse with libecso's defaults (f16 KV cache, flash attention off), every layer offloaded."""
    from ecso.runtime import EcsoOptions, EngineConfig
    from ecso.runtime.libecso import NativeEngine

    opts = dict(max_tokens=12, caption_max_tokens=12, **conformance.ALWAYS_UNSAFE)
    with NativeEngine(EngineConfig(model=str(tiny.llm), mmproj=str(tiny.mmproj), n_ctx=1024), libecso) as native:
        no_reuse = native.run(street_png, conformance.QUERY, EcsoOptions(reuse=False, **opts))
        cold = native.run(street_png, conformance.QUERY, EcsoOptions(reuse=True, **opts))
        warm = native.run(street_png, conformance.QUERY, EcsoOptions(reuse=True, **opts))
    assert native_offloads_everything(no_reuse)
    for r in (cold, warm):
        assert [s["text"] for s in r["steps"]] == [s["text"] for s in no_reuse["steps"]]
        assert r["judge_score"] == no_reuse["judge_score"]  # bit-identical logits
    assert (no_reuse["image_encodes"], cold["image_encodes"], warm["image_encodes"]) == (3, 1, 0)


@pytest.mark.gpu_demo
def test_demo_model_all_four_steps_match_python_on_the_device(libecso, demo_engine, demo_files, street_png):
    conformance.test_demo_model_all_four_steps_match_python(libecso, demo_engine, demo_files, street_png)


@pytest.mark.gpu_demo
def test_native_reuse_on_the_device_is_bit_exact_on_the_demo_model(libecso, demo_files, street_png):
    conformance.test_native_reuse_is_bit_exact_against_no_reuse(libecso, demo_files, street_png)


def native_offloads_everything(result: dict) -> bool:
    e = result["engine"]
    return bool(e["gpu_backend"] and e["n_gpu_layers"] == 999 and e["mmproj_gpu"])
