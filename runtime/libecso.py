"""ctypes access to libecso, the native engine (include/ecso.h): the same ECSO from Python, for the conformance tests
and `ecso bench`. Apps in other languages call the same C ABI through their own FFI.

The library is found at `library=`, else $ECSO_LIBECSO, else `build/libecso.so` of a source checkout (built with the
README's CMake commands). llama_cpp is imported first so libecso binds to the llama.cpp copy the Python engine
already uses: one llama.cpp per process.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional, Sequence

from ecso.runtime.errors import (Cancelled, ContextOverflowError, EngineError, ImageError, InputError,
                                 ModelError)

EVENT_KINDS = {0: "step_start", 1: "token", 2: "step_end", 3: "retract", 4: "eval_text", 5: "eval_image"}

STATUS = {1: InputError, 2: ImageError, 3: ModelError, 4: ContextOverflowError, 5: EngineError, 6: EngineError}


class NativeCancelled(Cancelled):
    """ecso_cancel (or ecso_close from another thread) stopped the request."""


def library_name() -> str:
    return {"darwin": "libecso.dylib", "win32": "ecso.dll"}.get(sys.platform, "libecso.so")


def find_library(explicit: Optional[str | os.PathLike] = None) -> Path:
    """Where libecso is; raises ModelError saying how to build it."""
    candidates = [explicit, os.environ.get("ECSO_LIBECSO"),
                  Path(__file__).resolve().parent.parent / "build" / library_name()]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    raise ModelError("libecso not found: build it (cmake -S . -B build && cmake --build build -j) or set ECSO_LIBECSO "
                     "to its path")


ABI_VERSION = 2  # ECSO_ABI_VERSION of include/ecso.h that these declarations mirror
CHAT_FORMATS = {"auto": 0, "llava-1.5": 1, "gguf": 2}  # ecso_chat_format
CPU_REPACK = {"auto": 0, "on": 1, "off": 2}  # ecso_cpu_repack
IMAGE_PATH, IMAGE_ENCODED, IMAGE_RGB = 0, 1, 2  # ecso_image_kind
ROLES = {"system": 0, "user": 1, "assistant": 2}  # ecso_role


class _Config(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("model", ctypes.c_char_p), ("mmproj", ctypes.c_char_p),
                ("n_ctx", ctypes.c_int32), ("n_batch", ctypes.c_int32), ("n_threads", ctypes.c_int32),
                ("n_gpu_layers", ctypes.c_int32), ("mmproj_gpu", ctypes.c_int32), ("flash_attn", ctypes.c_int32),
                ("kv_f32", ctypes.c_int32), ("chat_format", ctypes.c_int32), ("cpu_repack", ctypes.c_int32),
                ("image_cache_entries", ctypes.c_int32), ("max_query_chars", ctypes.c_int32),
                ("verbose", ctypes.c_int32)]


class _Turn(ctypes.Structure):
    _fields_ = [("role", ctypes.c_int32), ("content", ctypes.c_char_p)]


class _Options(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("judge", ctypes.c_int32), ("decision_rule", ctypes.c_int32),
                ("logit_threshold", ctypes.c_float), ("max_tokens", ctypes.c_int32),
                ("judge_max_tokens", ctypes.c_int32), ("judge_early_stop", ctypes.c_int32),
                ("caption_max_tokens", ctypes.c_int32), ("temperature", ctypes.c_float), ("top_p", ctypes.c_float),
                ("seed", ctypes.c_uint32), ("reuse", ctypes.c_int32), ("defense", ctypes.c_int32),
                ("guard_every", ctypes.c_int32), ("guard_threshold", ctypes.c_float),
                ("history", ctypes.POINTER(_Turn)), ("n_history", ctypes.c_int32)]


class _Image(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("kind", ctypes.c_int32), ("path", ctypes.c_char_p),
                ("data", ctypes.c_void_p), ("size", ctypes.c_size_t), ("rgb_width", ctypes.c_int32),
                ("rgb_height", ctypes.c_int32)]


class _Event(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("kind", ctypes.c_int32), ("step", ctypes.c_char_p),
                ("text", ctypes.c_char_p), ("tokens", ctypes.POINTER(ctypes.c_int32)), ("n_tokens", ctypes.c_int32),
                ("pos", ctypes.c_int32), ("n_pos", ctypes.c_int32)]


_EVENT_FN = ctypes.CFUNCTYPE(None, ctypes.POINTER(_Event), ctypes.c_void_p)
_LOCK = threading.Lock()
_LIBS: dict[str, ctypes.CDLL] = {}


def load_library(path: Optional[str | os.PathLike] = None) -> ctypes.CDLL:
    """Loads libecso once per path and declares its functions."""
    import llama_cpp  # noqa: F401  (binds libecso to this llama.cpp)
    import llama_cpp.mtmd_cpp  # noqa: F401

    p = str(find_library(path))
    with _LOCK:
        if p in _LIBS:
            return _LIBS[p]
        lib = ctypes.CDLL(p)
        vp, st = ctypes.c_void_p, ctypes.c_int
        sz, i32 = ctypes.c_size_t, ctypes.c_int32
        sigs = {
            "ecso_abi_version": ([], i32), "ecso_version": ([], ctypes.c_char_p),
            "ecso_last_error": ([], ctypes.c_char_p),
            "ecso_judge_name": ([i32], ctypes.c_char_p), "ecso_judge_from_name": ([ctypes.c_char_p], i32),
            "ecso_decision_rule_name": ([i32], ctypes.c_char_p),
            "ecso_decision_rule_from_name": ([ctypes.c_char_p], i32),
            "ecso_config_init": ([ctypes.POINTER(_Config), sz], st),
            "ecso_options_init": ([ctypes.POINTER(_Options), sz], st),
            "ecso_image_init": ([ctypes.POINTER(_Image), sz], st),
            "ecso_open": ([ctypes.POINTER(_Config), ctypes.POINTER(vp)], st),
            "ecso_run": ([vp, ctypes.POINTER(_Image), ctypes.c_char_p, ctypes.POINTER(_Options), _EVENT_FN, vp,
                          ctypes.POINTER(vp)], st),
            "ecso_cancel": ([vp], st), "ecso_clear_cache": ([vp], st), "ecso_close": ([vp], st), "ecso_free": ([vp], None),
            "ecso_engine_json": ([vp], ctypes.c_char_p), "ecso_result_json": ([vp], ctypes.c_char_p),
            "ecso_result_answer": ([vp], ctypes.c_char_p), "ecso_result_unsafe": ([vp], i32),
            "ecso_result_initial_answer": ([vp], ctypes.c_char_p), "ecso_result_judge_reply": ([vp], ctypes.c_char_p),
            "ecso_result_judge_score": ([vp, ctypes.POINTER(ctypes.c_double)], i32),
            "ecso_result_caption": ([vp], ctypes.c_char_p), "ecso_result_retracted": ([vp], i32),
            "ecso_result_image_encodes": ([vp], i32), "ecso_result_seconds": ([vp], ctypes.c_double),
            "ecso_result_n_steps": ([vp], i32), "ecso_result_step_name": ([vp, i32], ctypes.c_char_p),
            "ecso_result_step_seconds": ([vp, i32], ctypes.c_double),
            "ecso_result_step_reused_positions": ([vp, i32], i32),
            "ecso_result_step_evaluated_positions": ([vp, i32], i32),
            "ecso_result_step_generated_tokens": ([vp, i32], i32),
            "ecso_result_free": ([vp], None),
        }
        missing = [n for n in sigs if not hasattr(lib, n)]
        if not missing:
            lib.ecso_abi_version.restype = i32
        abi = None if missing else lib.ecso_abi_version()
        if abi != ABI_VERSION:
            raise ModelError(f"{p} implements libecso ABI {abi}, these bindings ABI {ABI_VERSION}; rebuild it "
                             "(cmake --build build)")
        for name, (args, res) in sigs.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
        _LIBS[p] = lib
        return lib


def _check(lib: ctypes.CDLL, status: int) -> None:
    if status == 0:
        return
    msg = (lib.ecso_last_error() or b"").decode("utf-8", errors="replace")
    if status == 7:
        raise NativeCancelled(msg)
    raise STATUS.get(status, EngineError)(msg)


def _b(s: Optional[str]) -> Optional[bytes]:
    return None if s is None else str(s).encode("utf-8")


def _text(s: str) -> bytes:
    """UTF-8 bytes; a lone surrogate passes through as the invalid bytes it is, for libecso to refuse (INPUT)."""
    return str(s).encode("utf-8", errors="surrogatepass")


class NativeEngine:
    """libecso's engine, loaded once: `run` returns the result dict (Result.to_dict's keys) and forwards events.
    `on_event(kind, step, text, tokens, pos, n_pos)`; kinds as ecso.h (eval_text / eval_image = the observer)."""

    def __init__(self, config, library: Optional[str | os.PathLike] = None):
        self._lib = lib = load_library(library)
        c = _Config()
        _check(lib, lib.ecso_config_init(ctypes.byref(c), ctypes.sizeof(c)))
        if config.chat_format not in CHAT_FORMATS or config.cpu_repack not in CPU_REPACK:
            raise InputError(f"chat format {config.chat_format!r} / cpu repack {config.cpu_repack!r}: use one of "
                             f"{', '.join(CHAT_FORMATS)} / {', '.join(CPU_REPACK)}")
        self._strings = [_b(config.model), _b(config.mmproj) if config.mmproj else None]
        c.model, c.mmproj = self._strings
        c.chat_format, c.cpu_repack = CHAT_FORMATS[config.chat_format], CPU_REPACK[config.cpu_repack]
        c.n_ctx, c.n_batch, c.n_threads = config.n_ctx, config.n_batch, config.n_threads or 0
        c.n_gpu_layers, c.mmproj_gpu = config.n_gpu_layers, int(config.mmproj_gpu)
        c.flash_attn = -1 if config.flash_attn is None else int(config.flash_attn)
        c.kv_f32, c.image_cache_entries = int(config.kv_f32), config.image_cache_entries
        c.max_query_chars, c.verbose = config.max_query_chars, int(config.verbose)
        self._h = ctypes.c_void_p()
        _check(lib, lib.ecso_open(ctypes.byref(c), ctypes.byref(self._h)))
        self.config = config

    @staticmethod
    def version(library: Optional[str | os.PathLike] = None) -> str:
        return load_library(library).ecso_version().decode()

    def describe(self) -> dict:
        return json.loads(self._lib.ecso_engine_json(self._h).decode())

    def run(self, image, query: str, options=None,
            on_event: Optional[Callable[[str, str, str, tuple, int, int], None]] = None,
            history: Sequence = ()) -> dict:
        """`history`: earlier turns (objects with .role and .content, e.g. ecso.runtime.Message), as `Ecso.run`."""
        from ecso.runtime import EcsoOptions, LoadedImage

        o = asdict(options or EcsoOptions())
        lib = self._lib
        opts = _Options()
        _check(lib, lib.ecso_options_init(ctypes.byref(opts), ctypes.sizeof(opts)))
        if o.get("system_prompt") is not None:  # never silently dropped
            raise InputError("the native engine does not take system_prompt (a system prompt for every step); "
                             "use the Python engine for it")
        opts.judge = lib.ecso_judge_from_name(_b(o["judge"]))
        opts.decision_rule = lib.ecso_decision_rule_from_name(_b(o["decision_rule"]))
        if opts.judge < 0 or opts.decision_rule < 0:
            raise InputError(f"unknown judge {o['judge']!r} or decision rule {o['decision_rule']!r}")
        turns = (_Turn * max(len(history), 1))()
        texts = [_text(m.content) for m in history]  # kept alive until ecso_run returns
        for i, (m, text) in enumerate(zip(history, texts)):
            if m.role not in ROLES:
                raise InputError(f"history turn {i} has role {m.role!r}; use system, user or assistant")
            turns[i] = _Turn(ROLES[m.role], text)
        opts.history, opts.n_history = (turns, len(history)) if history else (None, 0)
        for k in ("logit_threshold", "max_tokens", "judge_max_tokens", "caption_max_tokens", "temperature", "top_p",
                  "guard_every", "guard_threshold"):
            setattr(opts, k, o[k])
        opts.seed = o["seed"] & 0xFFFFFFFF
        opts.judge_early_stop, opts.reuse, opts.defense = (int(o["judge_early_stop"]), int(o["reuse"]),
                                                           int(o["defense"]))
        img, keep = None, None
        if image is not None:
            img = _Image()
            _check(lib, lib.ecso_image_init(ctypes.byref(img), ctypes.sizeof(img)))
        if isinstance(image, LoadedImage):
            keep = ctypes.create_string_buffer(image.rgb, len(image.rgb))
            img.kind, img.data, img.size = IMAGE_RGB, ctypes.cast(keep, ctypes.c_void_p), len(image.rgb)
            img.rgb_width, img.rgb_height = image.width, image.height
        elif isinstance(image, (bytes, bytearray)):
            keep = ctypes.create_string_buffer(bytes(image), len(image))
            img.kind, img.data, img.size = IMAGE_ENCODED, ctypes.cast(keep, ctypes.c_void_p), len(image)
        elif image is not None:
            keep = _b(os.fspath(image))
            img.kind, img.path = IMAGE_PATH, keep
        errors: list[BaseException] = []

        def forward(ev_p, _user):
            if on_event is None or errors:
                return
            ev = ev_p.contents
            if ev.kind not in EVENT_KINDS:  # a kind newer than these bindings: never passed on as another
                return
            try:
                toks = tuple(ev.tokens[i] for i in range(ev.n_tokens)) if ev.kind == 4 else ()
                on_event(EVENT_KINDS[ev.kind], (ev.step or b"").decode(), (ev.text or b"").decode("utf-8", "replace"),
                         toks, ev.pos, ev.n_pos)
            except BaseException as e:  # noqa: BLE001 - re-raised after the native call returns
                errors.append(e)
                self.cancel()

        cb = _EVENT_FN(forward) if on_event is not None else _EVENT_FN()  # NULL: no per-token calls into Python
        out = ctypes.c_void_p()
        status = self._lib.ecso_run(self._h, ctypes.byref(img) if img is not None else None,
                                    _text(query) if query is not None else None, ctypes.byref(opts), cb, None,
                                    ctypes.byref(out))
        if errors:
            raise errors[0]
        _check(self._lib, status)
        try:
            return json.loads(self._lib.ecso_result_json(out).decode("utf-8"))
        finally:
            self._lib.ecso_result_free(out)

    def cancel(self) -> None:
        self._lib.ecso_cancel(self._h)

    def clear_cache(self) -> None:
        """Empties the KV and encoded-image caches: the next request starts cold."""
        _check(self._lib, self._lib.ecso_clear_cache(self._h))

    def close(self) -> None:
        """Frees the model; later calls raise EngineError (the handle itself lives until this object goes)."""
        if self._h:
            self._lib.ecso_close(self._h)

    def __enter__(self) -> "NativeEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        h, self._h = getattr(self, "_h", None), None
        if h:
            self._lib.ecso_free(h)
