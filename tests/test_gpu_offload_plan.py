"""Where llama.cpp puts a model's layers (runtime/devices.py), as `ecso doctor` and `Result.engine` report it: the
rule of llama.cpp's `llama_model_load_from_file_impl` (src/llama.cpp) and `load_tensors` (src/llama-model.cpp)."""

from __future__ import annotations

import pytest

from ecso.runtime.devices import BackendDevice, offload_devices, offload_plan

CPU = BackendDevice("CPU", "AMD EPYC", "cpu", "CPU", 24000, 24000)
LAVAPIPE = BackendDevice("Vulkan0", "llvmpipe (LLVM 15.0.6, 256 bits)", "igpu", "Vulkan", 2048, 2048)
H100 = BackendDevice("CUDA0", "NVIDIA H100 80GB HBM3", "gpu", "CUDA", 81000, 80000)
IGPU_OTHER = BackendDevice("SYCL0", "Intel iGPU", "igpu", "SYCL", 8000, 8000)


@pytest.mark.fast
def test_all_layers_and_the_output_layer_go_to_the_device_with_minus_one():
    plan = offload_plan(30, -1, [CPU, LAVAPIPE])
    assert (plan.backend, plan.layers_offloaded, plan.layers_total) == ("Vulkan", 31, 31)
    assert plan.describe() == {"backend": "Vulkan", "devices": ["Vulkan0: llvmpipe (LLVM 15.0.6, 256 bits)"],
                               "layers_offloaded": "31/31"}
    assert offload_plan(30, 999, [CPU, LAVAPIPE]).layers_offloaded == 31
    assert offload_plan(30, 10, [CPU, LAVAPIPE]).layers_offloaded == 10


@pytest.mark.fast
def test_nothing_is_offloaded_without_a_device_or_with_zero_layers():
    assert offload_plan(30, -1, [CPU]).describe() == {"backend": "CPU", "devices": [], "layers_offloaded": "0/31"}
    assert offload_plan(30, 0, [CPU, H100]).describe() == {"backend": "CPU", "devices": [],
                                                            "layers_offloaded": "0/31"}


@pytest.mark.fast
def test_discrete_gpus_win_over_integrated_ones_and_integrated_ones_come_from_one_backend():
    assert offload_devices([CPU, LAVAPIPE, H100]) == [H100]
    assert offload_devices([CPU, LAVAPIPE, IGPU_OTHER]) == [LAVAPIPE]
    assert offload_devices([CPU]) == []


@pytest.mark.fast
def test_doctor_says_how_to_select_lavapipe_when_vulkan_shows_no_device():
    from types import SimpleNamespace

    from ecso.cli.doctor import device_lines

    report = SimpleNamespace(devices=[CPU], backends=["Vulkan", "CPU"], offload={
        "model": "/m/demo.gguf", "layers_offloaded": "0/31", "devices": [], "weights_mb": 93})
    text = "\n".join(device_lines(report))
    assert "Vulkan devices" in text and "GGML_VK_VISIBLE_DEVICES=0" in text
    assert "0/31 layers of demo.gguf on CPU" in text
    report = SimpleNamespace(devices=[CPU, LAVAPIPE], backends=["Vulkan", "CPU"], offload={
        "model": "/m/demo.gguf", "layers_offloaded": "31/31", "devices": ["Vulkan0: llvmpipe"], "weights_mb": 93,
        "devices_free_mb": 2048, "weights_fit": True})
    text = "\n".join(device_lines(report))
    assert "GGML_VK_VISIBLE_DEVICES" not in text
    assert "device Vulkan0" in text and "Vulkan igpu: llvmpipe" in text and "2048 MiB" in text
    assert "31/31 layers of demo.gguf on Vulkan0: llvmpipe; weights 93 MiB, 2048 MiB free: fit" in text
