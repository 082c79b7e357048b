"""CPU weight repacking: the AMX crash (ggml-org/llama.cpp#20824) is avoided by default, on whatever CPU runs this.

The decision is a pure function of llama.cpp's own feature report, so it is tested here on any machine; on an AMX
machine every other engine test in the suite also runs the real `use_extra_bufts=False` path."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from ecso.runtime.errors import ModelError
from ecso.runtime.llama_settings import choose_cpu_repack, llama_system_info, parse_system_info

AMX_BUILD = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
             "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | OPENMP = 1 | "
             "REPACK = 1 | ")
AVX2_BUILD = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
ARM_BUILD = "CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | DOTPROD = 1 | LLAMAFILE = 1 | REPACK = 1 | "
CUDA_AND_CPU = "CUDA : ARCHS = 890 | USE_GRAPHS = 1 | PEER_MAX_BATCH_SIZE = 128 | " + AVX2_BUILD


@pytest.mark.fast
def test_system_info_parses_every_backend_feature():
    f = parse_system_info(CUDA_AND_CPU)
    assert f["AVX2"] == "1" and f["ARCHS"] == "890" and f["REPACK"] == "1"
    assert "AMX_INT8" not in f


@pytest.mark.parametrize("report, enabled", [(AMX_BUILD, False), (AVX2_BUILD, True), (ARM_BUILD, True),
                                             (CUDA_AND_CPU, True), ("", True)])
def test_auto_turns_repack_off_exactly_on_amx_builds(report, enabled):
    choice = choose_cpu_repack("auto", parse_system_info(report))
    assert choice.enabled is enabled
    assert ("20824" in choice.reason) is (not enabled)


@pytest.mark.parametrize("report", [AMX_BUILD, AVX2_BUILD])
def test_explicit_setting_overrides_detection(report):
    feats = parse_system_info(report)
    assert choose_cpu_repack("on", feats).enabled is True
    assert choose_cpu_repack("off", feats).enabled is False


@pytest.mark.fast
def test_unknown_setting_is_a_clear_error():
    with pytest.raises(ModelError, match="auto, on, off"):
        choose_cpu_repack("maybe", {})


@pytest.mark.fast
def test_this_machine_gets_the_safe_choice():
    feats = llama_system_info()
    choice = choose_cpu_repack("auto", feats)
    assert choice.enabled is (feats.get("AMX_INT8", "0") in ("", "0"))


def test_engine_records_the_choice(demo_engine):
    d = demo_engine.describe()
    assert d["cpu_repack"] == "auto"
    assert d["cpu_repack_enabled"] is choose_cpu_repack("auto", llama_system_info()).enabled
    assert d["cpu_repack_reason"]


def test_quantized_demo_model_decodes_with_the_default_in_a_subprocess(demo_files):
    """The crash site is llama_decode on repacked quantized weights: run it where a segfault cannot take pytest down."""
    code = textwrap.dedent(f"""
        from ecso.runtime import Engine, EngineConfig, Message, Sampling
        with Engine(EngineConfig({demo_files[0]!r}, None, n_ctx=512)) as e:
            g = e.chat([Message("user", "Say hello.")], sampling=Sampling(max_tokens=8))
            print("OK", e.describe()["cpu_repack_enabled"], len(g.tokens))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"engine died with code {r.returncode}: {r.stderr[-2000:]}"
    assert r.stdout.startswith("OK")
