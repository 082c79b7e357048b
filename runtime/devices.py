"""Which llama.cpp devices exist (CPU, Vulkan, CUDA, Metal, ...), which ones a model is offloaded to, and how many
of its layers go there: read from ggml's backend registry through ctypes, never guessed from the platform.

llama.cpp's own rule (src/llama.cpp, `llama_model_load_from_file_impl`; src/llama-model.cpp, `load_tensors`): a
model uses every device of type GPU (deduplicated by device id), or, when there is none, the integrated GPUs of one
backend; with `n_gpu_layers = N` it offloads min(N, n_layer + 1) layers (the repeating layers and the output
layer) when it has any device, else none. A Vulkan device of type CPU (Mesa's lavapipe) is listed by ggml-vulkan
only when `GGML_VK_VISIBLE_DEVICES` names it.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}


@dataclass(frozen=True)
class BackendDevice:
    """One ggml device: `backend` is its registry's name (CPU, Vulkan, CUDA, Metal, ...)."""

    name: str  # e.g. Vulkan0, CUDA0, CPU
    description: str  # e.g. "llvmpipe (LLVM 15.0.6, 256 bits)", "NVIDIA H100 80GB HBM3"
    type: str  # cpu | gpu | igpu | accel | meta
    backend: str
    memory_total_mb: Optional[int] = None
    memory_free_mb: Optional[int] = None

    @property
    def offload_target(self) -> bool:
        return self.type in ("gpu", "igpu")


@dataclass(frozen=True)
class OffloadPlan:
    """Where a model's layers go: `layers_offloaded` of `layers_total` (repeating layers + output) on `devices`."""

    backend: str  # the offload devices' backend, "CPU" when nothing is offloaded
    devices: tuple[str, ...]  # "Vulkan0: llvmpipe (...)"
    layers_offloaded: int
    layers_total: int

    def describe(self) -> dict:
        return {"backend": self.backend, "devices": list(self.devices),
                "layers_offloaded": f"{self.layers_offloaded}/{self.layers_total}"}


def ggml_library_dir() -> Path:
    """The folder of libggml as llama-cpp-python loads it: `LLAMA_CPP_LIB_PATH` when set, else the package's lib/."""
    if os.environ.get("LLAMA_CPP_LIB_PATH"):
        return Path(os.environ["LLAMA_CPP_LIB_PATH"])
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib"


def ggml_libraries() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """libggml (backend registry) and libggml-base (devices, version)."""
    suffix = ".dylib" if sys.platform == "darwin" else ".dll" if sys.platform == "win32" else ".so"
    lib = ggml_library_dir()
    return ctypes.CDLL(str(lib / f"libggml{suffix}")), ctypes.CDLL(str(lib / f"libggml-base{suffix}"))


def list_backends_and_devices() -> tuple[list[str], list[BackendDevice]]:
    """Registered ggml backends and every device they expose, in llama.cpp's order."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    ggml, base = ggml_libraries()
    vp, sz = ctypes.c_void_p, ctypes.c_size_t
    for lib in (ggml, base):
        for fn, res, args in (("ggml_backend_reg_count", sz, []), ("ggml_backend_reg_get", vp, [sz]),
                              ("ggml_backend_dev_count", sz, []), ("ggml_backend_dev_get", vp, [sz])):
            if hasattr(lib, fn):
                getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, args
    for fn, res in (("ggml_backend_reg_name", ctypes.c_char_p), ("ggml_backend_dev_name", ctypes.c_char_p),
                    ("ggml_backend_dev_description", ctypes.c_char_p), ("ggml_backend_dev_type", ctypes.c_int),
                    ("ggml_backend_dev_backend_reg", vp)):
        getattr(base, fn).restype, getattr(base, fn).argtypes = res, [vp]
    base.ggml_backend_dev_memory.restype = None
    base.ggml_backend_dev_memory.argtypes = [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)]
    backends = [base.ggml_backend_reg_name(ggml.ggml_backend_reg_get(i)).decode()
                for i in range(ggml.ggml_backend_reg_count())]
    devices = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        free, total = sz(0), sz(0)
        base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        reg = base.ggml_backend_dev_backend_reg(dev)
        devices.append(BackendDevice(
            base.ggml_backend_dev_name(dev).decode(),
            (base.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
            DEVICE_TYPES.get(base.ggml_backend_dev_type(dev), "unknown"),
            base.ggml_backend_reg_name(reg).decode() if reg else "?",
            total.value // 2**20 if total.value else None, free.value // 2**20 if free.value else None))
    return backends, devices


def offload_devices(devices: list[BackendDevice]) -> list[BackendDevice]:
    """The devices llama.cpp puts a model's layers on by default: the GPUs, else the integrated GPUs of the first
    backend that has one (RPC devices are not counted here)."""
    gpus = [d for d in devices if d.type == "gpu" and d.backend != "RPC"]
    if gpus:
        return gpus
    igpus = [d for d in devices if d.type == "igpu"]
    return [d for d in igpus if d.backend == igpus[0].backend] if igpus else []


def offload_plan(n_layer: int, n_gpu_layers: int, devices: list[BackendDevice]) -> OffloadPlan:
    """How many of a model's n_layer + 1 layers go to the devices for a given n_gpu_layers (-1: all)."""
    targets = offload_devices(devices)
    total = n_layer + 1
    wanted = total if n_gpu_layers < 0 else n_gpu_layers
    n = min(wanted, total) if targets else 0
    return OffloadPlan(targets[0].backend if targets and n else "CPU",
                       tuple(f"{d.name}: {d.description}" for d in targets) if n else (), n, total)


def device_dict(d: BackendDevice) -> dict:
    return asdict(d)
