"""llama.cpp process settings: OpenMP waiting, log routing, GPU offload and CPU weight repacking.

Everything here is decided once per process or per model load, before or around the llama.cpp bindings; the
handles of a loaded model live in `llama_context.py`.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from typing import Any

from ecso.runtime.errors import ModelError


def prefer_short_openmp_spin() -> None:
    """Sets libgomp's waiting policy for llama.cpp's CPU threads, unless the user set OMP_WAIT_POLICY or
    GOMP_SPINCOUNT. Must run before llama_cpp loads (libgomp reads the environment once).

    Why: (1) libgomp's default 300k-spin wait steals the CPU from working threads when other programs load it
    (decode tok/s on 2 cores, quiet / two busy loops: default 108 / 25, OMP_WAIT_POLICY=PASSIVE 28 / 56,
    GOMP_SPINCOUNT=1000 126 / 46). (2) Every thread that runs llama.cpp gets its own OpenMP team; with more team
    threads than cores libgomp "throttles" its spin to 100, so from the second team on (a server's request thread,
    the batch scheduler, a second engine) every barrier sleeps in the kernel: a 4-token decode took 43 ms instead of
    31 ms on 2 cores, in every thread. OMP_WAIT_POLICY=active with GOMP_SPINCOUNT=1000 makes both spins 1000:
    31 ms in every thread, and still short under load."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "active"
    os.environ["GOMP_SPINCOUNT"] = "1000"


# llama.cpp and mtmd log through process-wide callbacks: the ctypes objects must outlive every context, so they
# live here for the life of the process (the one piece of module state, required by the C API).
_LOG_CALLBACKS: dict[str, Any] = {}


def set_native_logging(verbose: bool) -> None:
    """Silences llama.cpp / mtmd logs (default) or lets them through to stderr (`-v`)."""
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd

    if verbose:
        @llama_cpp.llama_log_callback
        def cb(level, text, user_data):  # noqa: ARG001
            sys.stderr.write(text.decode("utf-8", errors="replace"))
    else:
        @llama_cpp.llama_log_callback
        def cb(level, text, user_data):  # noqa: ARG001
            return None

    _LOG_CALLBACKS["cb"] = cb
    llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))
    mtmd.mtmd_log_set(cb, ctypes.c_void_p(0))
    mtmd.mtmd_helper_log_set(cb, ctypes.c_void_p(0))


def gpu_offload_supported() -> bool:
    """True when this llama.cpp build has a GPU backend (CUDA, Metal, Vulkan, ...)."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())



# --- CPU weight repacking (llama.cpp's "extra buffer types") -----------------------------------------------------
CPU_REPACK_SETTINGS = ("auto", "on", "off")


@dataclass(frozen=True)
class CpuRepackChoice:
    """Whether a model loads with llama.cpp's extra CPU buffer types (weight repacking: AMX, CPU_REPACK, ...).

    Why: on AMX CPUs llama.cpp's AMX buffer segfaults inside `ggml_backend_amx_mul_mat` (ggml-org/llama.cpp#20824,
    never fixed upstream in our pin); `use_extra_bufts=False` avoids it at some speed cost. `auto` turns repacking
    off exactly when the llama.cpp build reports AMX; `on`/`off` are for users who know their build."""

    setting: str  # auto | on | off (what was asked)
    enabled: bool  # what the model was loaded with
    reason: str

    def describe(self) -> dict:
        return {"cpu_repack": self.setting, "cpu_repack_enabled": self.enabled, "cpu_repack_reason": self.reason}


def llama_system_info() -> dict[str, str]:
    """llama.cpp's own feature report (`llama_print_system_info`) as {feature: value}, e.g. {"AMX_INT8": "1"}."""
    import llama_cpp

    return parse_system_info(llama_cpp.llama_print_system_info().decode("utf-8", errors="replace"))


def parse_system_info(text: str) -> dict[str, str]:
    """Parses `CPU : SSE3 = 1 | AVX2 = 1 | AMX_INT8 = 1 | ...` (features of every backend, later ones win)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        for part in line.split("|"):
            if "=" not in part:
                continue
            key, _, value = part.partition("=")
            key = key.split(":")[-1].strip()  # "CPU : SSE3" -> "SSE3"
            if key:
                out[key] = value.strip()
    return out


def choose_cpu_repack(setting: str, features: dict[str, str]) -> CpuRepackChoice:
    """The decision, as a pure function of the setting and llama.cpp's feature report (tested on any machine)."""
    if setting not in CPU_REPACK_SETTINGS:
        raise ModelError(f"unknown cpu_repack setting {setting!r}; use one of {', '.join(CPU_REPACK_SETTINGS)}")
    if setting == "on":
        return CpuRepackChoice(setting, True, "forced on")
    if setting == "off":
        return CpuRepackChoice(setting, False, "forced off")
    if features.get("AMX_INT8", "0") not in ("", "0"):
        return CpuRepackChoice(setting, False, "this llama.cpp build uses AMX, whose repacked weights crash "
                                               "llama.cpp (ggml-org/llama.cpp#20824)")
    return CpuRepackChoice(setting, True, "no AMX in this llama.cpp build")


def resolve_cpu_repack(setting: str) -> CpuRepackChoice:
    return choose_cpu_repack(setting, llama_system_info())


class default_model_params_without_repack:
    """Context manager for llama-cpp-python's own `Llama(...)`, which gives no access to `use_extra_bufts`: while
    active, `llama_cpp.llama_model_default_params()` returns params with `use_extra_bufts` set as chosen. Used only
    where a stock `Llama` must load a GGUF (the bench's decode-speed reference)."""

    def __init__(self, choice: CpuRepackChoice):
        self.choice = choice

    def __enter__(self):
        import llama_cpp.llama_cpp as bindings  # the module `Llama` calls through

        self._orig = bindings.llama_model_default_params
        orig, enabled = self._orig, self.choice.enabled

        def params():
            p = orig()
            p.use_extra_bufts = enabled
            return p

        bindings.llama_model_default_params = params
        return self

    def __exit__(self, *exc):
        import llama_cpp.llama_cpp as bindings

        bindings.llama_model_default_params = self._orig
