"""The GPU tier's common parts: which device it runs on (skipped on CPU builds, a failure when `.ci/gpu-tier` asked
for the tier and no device shows), engine configs with every layer and the projector offloaded, and the models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TIER_ENV = "ECSO_GPU_TIER"  # set by .ci/gpu-tier: a missing device is then a failure, not a skip
NO_DEVICE = ("no GPU device: the GPU tier runs in the Vulkan venv (.ci/gpu-tier) with the device selected, e.g. "
             "GGML_VK_VISIBLE_DEVICES=0 for Mesa lavapipe")


def gpu_devices() -> list:
    """The devices llama.cpp offloads to in this build (empty on CPU builds)."""
    from ecso.runtime.devices import list_backends_and_devices, offload_devices

    return offload_devices(list_backends_and_devices()[1])


def require_gpu() -> list:
    devices = gpu_devices()
    if not devices:
        if os.environ.get(TIER_ENV):
            pytest.fail(NO_DEVICE)
        pytest.skip(NO_DEVICE)
    return devices


def offloaded(llm, mmproj, exact: bool = True, **kw):
    """Every layer and the projector on the device. exact: f32 KV cache and flash attention off (the CPU tests'
    exact-arithmetic settings); else the defaults (f16 KV, the default flash-attention choice)."""
    from ecso.runtime import EngineConfig

    base = dict(model=str(llm), mmproj=str(mmproj) if mmproj else None, n_ctx=2048, n_gpu_layers=-1,
                mmproj_gpu=True)
    if exact:
        base.update(kv_f32=True, flash_attn=False)
    return EngineConfig(**{**base, **kw})


def model_files(name: str) -> tuple[Path, Path]:
    """(llm, mmproj) of a model the CPU tests build, by name: tiny-llava (CLIP tower, our exporter), qwen2vl and
    gemma3 (llama.cpp's converter), llava-next (LLaVA-1.6, SigLIP tower), demo (SmolLM2-135M + its projector)."""
    if name == "demo":
        from ecso.models.registry import resolve

        e = resolve("demo")
        return Path(e.model), Path(e.mmproj)
    if name in ("qwen2vl", "gemma3"):
        from ecso.models.converted import converted_family
        from ecso.models.families import smollm2_vocab

        c = converted_family(name, vocab_cache=smollm2_vocab())
        return c.llm, c.mmproj
    if name == "llava-next":
        from ecso.models.llava_next import exported_llava_next

        m = exported_llava_next("siglip")
        return m.llm, m.mmproj
    raise ValueError(name)


def run_on_cpu(code: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs code in a child of this interpreter with no GPU device visible (GGML_VK_VISIBLE_DEVICES empty: ggml-vulkan
    lists no CPU-type device; CUDA_VISIBLE_DEVICES empty), so the same llama.cpp build runs on its CPU backend."""
    env = dict(os.environ, GGML_VK_VISIBLE_DEVICES="", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
