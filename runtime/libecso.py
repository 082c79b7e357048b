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
from typing import Callable, Optional

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


class _Config(ctypes.Structure):
    _fields_ = [("model", ctypes.c_char_p), ("mmproj", ctypes.c_char_p), ("n_ctx", ctypes.c_int32),
                ("n_batch", ctypes.c_int32), ("n_threads", ctypes.c_int32), ("n_gpu_layers", ctypes.c_int32),
                ("mmproj_gpu", ctypes.c_int32), ("flash_attn", ctypes.c_int32), ("kv_f32", ctypes.c_int32),
                ("chat_format", ctypes.c_char_p), ("cpu_repack", ctypes.c_char_p),
                ("image_cache_entries", ctypes.c_int32), ("max_query_chars", ctypes.c_int32),
                ("verbose", ctypes.c_int32)]


class _Options(ctypes.Structure):
    _fields_ = [("judge", ctypes.c_char_p), ("decision_rule", ctypes.c_char_p), ("logit_threshold", ctypes.c_float),
                ("max_tokens", ctypes.c_int32), ("judge_max_tokens", ctypes.c_int32),
                ("judge_early_stop", ctypes.c_int32), ("caption_max_tokens", ctypes.c_int32),
                ("temperature", ctypes.c_float), ("top_p", ctypes.c_float), ("seed", ctypes.c_uint32),
                ("reuse", ctypes.c_int32), ("defense", ctypes.c_int32), ("guard_every", ctypes.c_int32),
                ("guard_threshold", ctypes.c_float)]


class _Image(ctypes.Structure):
    _fields_ = [("path", ctypes.c_char_p), ("data", ctypes.c_void_p), ("size", ctypes.c_size_t),
                ("rgb_width", ctypes.c_int32), ("rgb_height", ctypes.c_int32)]


class _Event(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("step", ctypes.c_char_p), ("text", ctypes.c_char_p),
                ("tokens", ctypes.POINTER(ctypes.c_int32)), ("n_tokens", ctypes.c_int32), ("pos", ctypes.c_int32),
                ("n_pos", ctypes.c_int32)]


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
        sigs = {
            "ecso_version": ([], ctypes.c_char_p), "ecso_last_error": ([], ctypes.c_char_p),
            "ecso_config_default": ([], _Config), "ecso_options_default": ([], _Options),
            "ecso_open": ([ctypes.POINTER(_Config), ctypes.POINTER(vp)], st),
            "ecso_run": ([vp, ctypes.POINTER(_Image), ctypes.c_char_p, ctypes.POINTER(_Options), _EVENT_FN, vp,
                          ctypes.POINTER(vp)], st),
            "ecso_cancel": ([vp], st), "ecso_clear_cache": ([vp], st), "ecso_close": ([vp], st), "ecso_free": ([vp], None),
            "ecso_engine_json": ([vp], ctypes.c_char_p), "ecso_result_json": ([vp], ctypes.c_char_p),
            "ecso_result_answer": ([vp], ctypes.c_char_p), "ecso_result_unsafe": ([vp], ctypes.c_int32),
            "ecso_result_free": ([vp], None),
        }
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


class NativeEngine:
    """libecso's engine, loaded once: `run` returns the result dict (Result.to_dict's keys) and forwards events.
    `on_event(kind, step, text, tokens, pos, n_pos)`; kinds as ecso.h (eval_text / eval_image = the observer)."""

    def __init__(self, config, library: Optional[str | os.PathLike] = None):
        self._lib = lib = load_library(library)
        c = lib.ecso_config_default()
        self._strings = [_b(config.model), _b(config.mmproj) if config.mmproj else None, _b(config.chat_format),
                         _b(config.cpu_repack)]
        c.model, c.mmproj, c.chat_format, c.cpu_repack = self._strings
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
            on_event: Optional[Callable[[str, str, str, tuple, int, int], None]] = None) -> dict:
        from ecso.runtime.ecso import EcsoOptions
        from ecso.runtime.images import LoadedImage

        o = asdict(options or EcsoOptions())
        opts = self._lib.ecso_options_default()
        judge, rule = _b(o["judge"]), _b(o["decision_rule"])
        opts.judge, opts.decision_rule = judge, rule
        for k in ("logit_threshold", "max_tokens", "judge_max_tokens", "caption_max_tokens", "temperature", "top_p",
                  "guard_every", "guard_threshold"):
            setattr(opts, k, o[k])
        opts.seed = o["seed"] & 0xFFFFFFFF
        opts.judge_early_stop, opts.reuse, opts.defense = (int(o["judge_early_stop"]), int(o["reuse"]),
                                                           int(o["defense"]))
        img, keep = None, None
        if isinstance(image, LoadedImage):
            keep = ctypes.create_string_buffer(image.rgb, len(image.rgb))
            img = _Image(None, ctypes.cast(keep, ctypes.c_void_p), len(image.rgb), image.width, image.height)
        elif isinstance(image, (bytes, bytearray)):
            keep = ctypes.create_string_buffer(bytes(image), len(image))
            img = _Image(None, ctypes.cast(keep, ctypes.c_void_p), len(image), 0, 0)
        elif image is not None:
            keep = _b(os.fspath(image))
            img = _Image(keep, None, 0, 0, 0)
        errors: list[BaseException] = []

        def forward(ev_p, _user):
            if on_event is None or errors:
                return
            ev = ev_p.contents
            try:
                toks = tuple(ev.tokens[i] for i in range(ev.n_tokens)) if ev.kind == 4 else ()
                on_event(EVENT_KINDS[ev.kind], (ev.step or b"").decode(), (ev.text or b"").decode("utf-8", "replace"),
                         toks, ev.pos, ev.n_pos)
            except BaseException as e:  # noqa: BLE001 - re-raised after the native call returns
                errors.append(e)
                self.cancel()

        cb = _EVENT_FN(forward)
        out = ctypes.c_void_p()
        status = self._lib.ecso_run(self._h, ctypes.byref(img) if img is not None else None,
                                    _b(query) if query is not None else None, ctypes.byref(opts), cb, None,
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
