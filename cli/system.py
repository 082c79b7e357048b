"""What a bug report needs: versions, llama.cpp's backends and devices, CPU features, ONNX providers, and a smoke
run of the engine in a child process (so a native crash is reported, not suffered).

Everything here is read from the libraries themselves (llama.cpp's feature report and backend registry through
ctypes, onnxruntime's provider list), never guessed from the platform.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import json
import platform
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ecso.runtime.devices import ggml_libraries, list_backends_and_devices, offload_plan
from ecso.runtime.gguf_info import read_gguf_info
from ecso.runtime.llama_settings import choose_cpu_repack, llama_system_info
# features of the CPU backend worth a line in a bug report, in the order people look for them
CPU_FEATURES = ("AMX_INT8", "AVX512", "AVX512_VNNI", "AVX512_BF16", "AVX_VNNI", "AVX2", "AVX", "FMA", "F16C",
                "NEON", "ARM_FMA", "DOTPROD", "SVE", "SME", "OPENMP", "REPACK", "LLAMAFILE")


@dataclass
class Device:
    name: str
    description: str
    type: str  # cpu | gpu | igpu | accel | meta
    memory_total_mb: Optional[int] = None
    memory_free_mb: Optional[int] = None
    backend: Optional[str] = None  # the ggml backend that exposes it: CPU, Vulkan, CUDA, Metal, ...


@dataclass
class SmokeResult:
    ok: bool
    returncode: Optional[int]
    seconds: float
    message: str  # what happened, in one line
    detail: dict = field(default_factory=dict)


@dataclass
class SystemReport:
    versions: dict
    platform: dict
    backends: list[str]
    devices: list[Device]
    llama_features: dict  # llama.cpp's own feature report (what the build uses)
    cpu_flags: list[str]  # what the CPU itself reports (Linux /proc/cpuinfo), for comparison
    cpu_repack: dict  # what `--cpu-repack auto` decides here, and why
    gpu_offload: bool
    onnxruntime: dict
    demo_model: dict
    offload: Optional[dict] = None  # where a model's layers would go with -ngl -1 (model_offload)
    smoke: Optional[SmokeResult] = None

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def llama_cpp_build() -> dict:
    """ggml's version and commit (the llama.cpp build inside llama-cpp-python)."""
    try:
        _, base = ggml_libraries()
        base.ggml_version.restype = ctypes.c_char_p
        base.ggml_commit.restype = ctypes.c_char_p
        return {"ggml_version": base.ggml_version().decode(), "ggml_commit": base.ggml_commit().decode()}
    except (OSError, AttributeError) as e:
        return {"error": f"could not read the ggml version: {e}"}


def backends_and_devices() -> tuple[list[str], list[Device]]:
    """Registered ggml backends (CPU, CUDA, Metal, Vulkan, ...) and the devices llama.cpp can use."""
    backends, devices = list_backends_and_devices()
    return backends, [Device(d.name, d.description, d.type, d.memory_total_mb, d.memory_free_mb, d.backend)
                      for d in devices]


def model_offload(model: str, n_gpu_layers: int = -1) -> dict:
    """Where `model`'s layers would go with `n_gpu_layers` (-1: all), read from its GGUF header and the devices
    present, and whether its weights fit the devices' free memory (the KV cache and compute buffers come on top)."""
    info = read_gguf_info(model, "model")
    n_layer = info.get("{arch}.block_count")
    if n_layer is None:
        return {"model": model, "error": "the GGUF header has no block_count"}
    _, devices = list_backends_and_devices()
    plan = offload_plan(int(n_layer), n_gpu_layers, devices)
    free = [d.memory_free_mb for d in devices if f"{d.name}: {d.description}" in plan.devices]
    weights_mb = Path(model).stat().st_size // 2**20
    out = {"model": model, "n_gpu_layers": n_gpu_layers, **plan.describe(), "weights_mb": weights_mb}
    if plan.layers_offloaded and all(f is not None for f in free):
        out["devices_free_mb"] = sum(free)
        out["weights_fit"] = weights_mb < sum(free)
    return out


def cpu_flags() -> list[str]:
    """The CPU's own SIMD/matrix flags (Linux), to compare with what the llama.cpp build uses."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags = line.split(":", 1)[1].split()
            return sorted(f for f in flags if f.startswith(("amx", "avx", "fma", "f16c", "asimd", "sve"))
                          or f in ("sme", "sme2"))
    return []


def onnxruntime_info() -> dict:
    if importlib.util.find_spec("onnxruntime") is None:
        return {"installed": False, "hint": "pip install 'ecso[onnx]' (CPU) or 'ecso[onnx-gpu]' (CUDA) for ONNX heads"}
    try:
        import onnxruntime as ort

        return {"installed": True, "version": ort.__version__, "providers": ort.get_available_providers()}
    except Exception as e:  # a broken install (e.g. onnxruntime and onnxruntime-gpu both installed)
        return {"installed": True, "error": f"onnxruntime failed to import: {e}"}


def demo_model_info() -> dict:
    from ecso.models.demo import DemoModelMissing, demo_llm_path

    try:
        return {"installed": True, "llm": str(demo_llm_path())}
    except DemoModelMissing as e:
        return {"installed": False, "hint": str(e)}


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def smoke_test(cpu_repack: str = "auto", timeout: float = 300.0, max_tokens: int = 8) -> SmokeResult:
    """Loads the demo model (+ projector) in a child process and runs one short ECSO request with an image.
    A native crash kills only the child and comes back as a message that says what to try."""
    code = (
        "import json, sys\n"
        "from ecso.models.registry import resolve\n"
        "from ecso.runtime import Ecso, EngineConfig\n"
        "from PIL import Image\n"
        "e = resolve('demo')\n"
        f"with Ecso(EngineConfig(e.model, e.mmproj, n_ctx=1024, cpu_repack={cpu_repack!r})) as ecso:\n"
        f"    r = ecso.run(Image.new('RGB', (64, 48), (200, 40, 40)), 'What colour is this?', max_tokens={max_tokens})\n"
        "    print(json.dumps({'answer': r.answer, 'unsafe': r.unsafe, 'steps': [s.name for s in r.steps],\n"
        "                      'image_encodes': r.image_encodes, 'seconds': r.seconds,\n"
        "                      'cpu_repack_enabled': r.engine['cpu_repack_enabled']}))\n"
    )
    return run_smoke_child(code, cpu_repack, timeout)


def run_smoke_child(code: str, cpu_repack: str, timeout: float) -> SmokeResult:
    """Runs `code` in a child Python; its last stdout line is a JSON result. Signals become a plain message."""
    import time

    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return SmokeResult(False, None, time.perf_counter() - t0, f"the engine did not answer within {timeout:.0f} s")
    seconds = time.perf_counter() - t0
    if p.returncode < 0:
        sig = _signal_name(p.returncode)
        hint = "; try --cpu-repack off" if cpu_repack != "off" else ""
        return SmokeResult(False, p.returncode, seconds, f"the engine crashed with {sig}{hint}",
                           {"stderr_tail": p.stderr[-1500:]})
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        return SmokeResult(False, p.returncode, seconds, f"the engine failed: {last}", {"stderr_tail": p.stderr[-1500:]})
    try:
        detail = json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return SmokeResult(False, 0, seconds, "the engine printed no result", {"stdout_tail": p.stdout[-500:]})
    steps = ", ".join(detail.get("steps", []))
    return SmokeResult(True, 0, seconds, f"ECSO ran ({steps}) in {detail.get('seconds', seconds):.2f} s", detail)


def system_report(smoke: bool = True, cpu_repack: str = "auto", offload_model: Optional[str] = None) -> SystemReport:
    import llama_cpp

    features = llama_system_info()
    backends, devices = backends_and_devices()
    versions = {"ecso": _version("ecso"), "llama-cpp-python": llama_cpp.__version__, **llama_cpp_build(),
                "python": platform.python_version(), "numpy": _version("numpy"), "pillow": _version("pillow")}
    report = SystemReport(
        versions=versions,
        platform={"system": platform.system(), "release": platform.release(), "machine": platform.machine(),
                  "processor": platform.processor() or None},
        backends=backends, devices=devices,
        llama_features={k: features[k] for k in CPU_FEATURES if k in features} | {
            k: v for k, v in features.items() if k not in CPU_FEATURES},
        cpu_flags=cpu_flags(),
        cpu_repack=asdict(choose_cpu_repack("auto", features)),
        gpu_offload=bool(llama_cpp.llama_supports_gpu_offload()),
        onnxruntime=onnxruntime_info(), demo_model=demo_model_info())
    model = offload_model or report.demo_model.get("llm")
    if model:
        report.offload = model_offload(str(model))
    if smoke:
        if report.demo_model["installed"]:
            report.smoke = smoke_test(cpu_repack)
        else:
            report.smoke = SmokeResult(False, None, 0.0, "skipped: the demo model is not installed")
    return report
