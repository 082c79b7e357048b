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

from ecso.runtime.llama_settings import choose_cpu_repack, llama_system_info

_DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}
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


def _ggml_libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """libggml (backend registry) and libggml-base (devices, version), as loaded by llama-cpp-python."""
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    suffix = ".dylib" if sys.platform == "darwin" else ".dll" if sys.platform == "win32" else ".so"
    return ctypes.CDLL(str(lib / f"libggml{suffix}")), ctypes.CDLL(str(lib / f"libggml-base{suffix}"))


def llama_cpp_build() -> dict:
    """ggml's version and commit (the llama.cpp build inside llama-cpp-python)."""
    try:
        _, base = _ggml_libs()
        base.ggml_version.restype = ctypes.c_char_p
        base.ggml_commit.restype = ctypes.c_char_p
        return {"ggml_version": base.ggml_version().decode(), "ggml_commit": base.ggml_commit().decode()}
    except (OSError, AttributeError) as e:
        return {"error": f"could not read the ggml version: {e}"}


def backends_and_devices() -> tuple[list[str], list[Device]]:
    """Registered ggml backends (CPU, CUDA, Metal, ...) and the devices llama.cpp can use."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    ggml, base = _ggml_libs()
    vp, sz = ctypes.c_void_p, ctypes.c_size_t
    for lib in (ggml, base):
        for fn, res, args in (("ggml_backend_reg_count", sz, []), ("ggml_backend_reg_get", vp, [sz]),
                              ("ggml_backend_dev_count", sz, []), ("ggml_backend_dev_get", vp, [sz])):
            if hasattr(lib, fn):
                getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, args
    base.ggml_backend_reg_name.restype, base.ggml_backend_reg_name.argtypes = ctypes.c_char_p, [vp]
    base.ggml_backend_dev_name.restype, base.ggml_backend_dev_name.argtypes = ctypes.c_char_p, [vp]
    base.ggml_backend_dev_description.restype, base.ggml_backend_dev_description.argtypes = ctypes.c_char_p, [vp]
    base.ggml_backend_dev_type.restype, base.ggml_backend_dev_type.argtypes = ctypes.c_int, [vp]
    base.ggml_backend_dev_memory.restype = None
    base.ggml_backend_dev_memory.argtypes = [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)]
    backends = [base.ggml_backend_reg_name(ggml.ggml_backend_reg_get(i)).decode()
                for i in range(ggml.ggml_backend_reg_count())]
    devices = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        kind = _DEVICE_TYPES.get(base.ggml_backend_dev_type(dev), "unknown")
        free, total = sz(0), sz(0)
        base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        devices.append(Device(base.ggml_backend_dev_name(dev).decode(),
                              (base.ggml_backend_dev_description(dev) or b"").decode(errors="replace"), kind,
                              total.value // 2**20 if total.value else None,
                              free.value // 2**20 if free.value else None))
    return backends, devices


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


def system_report(smoke: bool = True, cpu_repack: str = "auto") -> SystemReport:
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
    if smoke:
        if report.demo_model["installed"]:
            report.smoke = smoke_test(cpu_repack)
        else:
            report.smoke = SmokeResult(False, None, 0.0, "skipped: the demo model is not installed")
    return report
