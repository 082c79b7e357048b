"""libecso's C ABI on bad input and across threads: every failure is an error code plus a one-line message, never an
abort (each case runs in a fresh interpreter that prints what it saw), and cancel / close work from another thread."""

from __future__ import annotations

import json
import struct
import textwrap
import threading

import pytest

from conftest import run_python
from ecso.runtime import EcsoOptions, EngineConfig, run
from ecso.runtime.errors import ContextOverflowError, EngineError, ImageError, InputError, ModelError
from ecso.runtime.libecso import NativeCancelled, NativeEngine
from support.reliability import crafted_png

PRELUDE = """
import ctypes, json, sys
from ecso.runtime.libecso import load_library, _Config, _Options, _Image, _EVENT_FN
lib = load_library({lib!r})
out = {{}}
def status(name, rc):
    out[name] = [rc, lib.ecso_last_error().decode()]
def config():
    c = _Config()
    assert lib.ecso_config_init(ctypes.byref(c), ctypes.sizeof(c)) == 0
    return c
def options():
    o = _Options()
    assert lib.ecso_options_init(ctypes.byref(o), ctypes.sizeof(o)) == 0
    return o
def image(kind, path=None, data=None, size=0, w=0, h=0):
    i = _Image()
    assert lib.ecso_image_init(ctypes.byref(i), ctypes.sizeof(i)) == 0
    i.kind, i.path, i.data, i.size, i.rgb_width, i.rgb_height = kind, path, data, size, w, h
    return i
PATH, ENCODED, RGB = 0, 1, 2
"""


def run_cases(libecso, body: str, **fmt) -> dict:
    code = textwrap.dedent(PRELUDE.format(lib=str(libecso))) + textwrap.dedent(body.format(**fmt)) + \
        "\nprint(json.dumps(out))\n"
    r = run_python(code, timeout=300)
    assert r.returncode == 0, f"the process died (rc {r.returncode}):\n{r.stderr[-2000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_null_pointers_and_bad_files_return_errors_not_aborts(libecso, tmp_path, demo_files):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(open(demo_files[0], "rb").read(4096))
    out = run_cases(libecso, """
        h = ctypes.c_void_p()
        status("open_null_config", lib.ecso_open(None, ctypes.byref(h)))
        c = config()
        status("open_null_out", lib.ecso_open(ctypes.byref(c), None))
        status("open_null_model", lib.ecso_open(ctypes.byref(c), ctypes.byref(h)))
        for name, path in (("missing", "/nonexistent.gguf"), ("junk", {junk!r}), ("truncated", {truncated!r}),
                           ("mmproj_as_model", {mmproj!r})):
            c.model = path.encode()
            status("open_" + name, lib.ecso_open(ctypes.byref(c), ctypes.byref(h)))
        c.model, c.mmproj = {model!r}.encode(), {junk!r}.encode()
        status("open_bad_mmproj", lib.ecso_open(ctypes.byref(c), ctypes.byref(h)))
        c.mmproj, c.cpu_repack = None, 3
        status("open_bad_repack", lib.ecso_open(ctypes.byref(c), ctypes.byref(h)))
        res = ctypes.c_void_p()
        status("run_null_engine", lib.ecso_run(None, None, b"q", None, _EVENT_FN(0), None, ctypes.byref(res)))
        status("cancel_null", lib.ecso_cancel(None))
        status("close_null", lib.ecso_close(None))
        lib.ecso_free(None)
        lib.ecso_result_free(None)
        out["null_result_answer"] = lib.ecso_result_answer(None).decode()
    """, junk=str(junk), truncated=str(truncated), model=demo_files[0], mmproj=demo_files[1])
    input_err, model_err = 1, 3
    assert out["open_null_config"][0] == input_err and "config" in out["open_null_config"][1]
    assert out["open_null_out"][0] == input_err
    assert out["open_null_model"][0] == input_err and "model" in out["open_null_model"][1]
    assert out["open_missing"] == [model_err, "model file not found: /nonexistent.gguf"]
    assert out["open_junk"][0] == model_err and "not a GGUF file" in out["open_junk"][1]
    assert out["open_truncated"][0] == model_err and "truncated" in out["open_truncated"][1]
    assert out["open_mmproj_as_model"][0] == model_err and "is an mmproj" in out["open_mmproj_as_model"][1]
    assert out["open_bad_mmproj"][0] == model_err and "not a GGUF" in out["open_bad_mmproj"][1]
    assert out["open_bad_repack"][0] == input_err and "ecso_cpu_repack" in out["open_bad_repack"][1]
    assert out["run_null_engine"][0] == input_err and out["cancel_null"][0] == input_err
    assert out["close_null"][0] == input_err and out["null_result_answer"] == ""
    assert all("\n" not in v[1] for v in out.values() if isinstance(v, list))  # one-line messages


def test_bad_requests_closed_engine_and_overflow_return_errors(libecso, tmp_path, demo_files, street_png):
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is text, not a PNG")
    out = run_cases(libecso, """
        c = config()
        c.model, c.mmproj, c.n_ctx = {model!r}.encode(), {mmproj!r}.encode(), 512
        h = ctypes.c_void_p()
        status("open", lib.ecso_open(ctypes.byref(c), ctypes.byref(h)))
        o = options()
        o.max_tokens = 4
        res = ctypes.c_void_p()
        none = _EVENT_FN(0)
        def run(name, image, query, opts=o):
            rc = lib.ecso_run(h, ctypes.byref(image) if image is not None else None, query, ctypes.byref(opts), none,
                              None, ctypes.byref(res))
            status(name, rc)
            out[name].append(res.value is None)
            if rc == 0:
                lib.ecso_result_free(res)
        img = image(PATH, {street!r}.encode())
        run("null_query", img, None)
        run("empty_query", img, b"  ")
        run("invalid_utf8_query", img, b"caf\\xc3 \\xff")
        run("no_path_no_data", image(PATH), b"q")
        run("missing_image", image(PATH, b"/nonexistent.png"), b"q")
        run("not_an_image", image(PATH, {not_image!r}.encode()), b"q")
        buf = ctypes.create_string_buffer(b"garbage" * 10)
        run("garbage_bytes", image(ENCODED, None, ctypes.cast(buf, ctypes.c_void_p), 70), b"q")
        run("rgb_size_mismatch", image(RGB, None, ctypes.cast(buf, ctypes.c_void_p), 70, 10, 10), b"q")
        run("rgb_too_large", image(RGB, None, ctypes.cast(buf, ctypes.c_void_p), 3 * 20000 * 1, 20000, 1), b"q")
        run("unknown_image_kind", image(9, {street!r}.encode()), b"q")
        newer = image(PATH, {street!r}.encode())
        newer.struct_size = ctypes.sizeof(newer) + 16
        run("image_from_newer_header", newer, b"q")
        big = o.__class__.from_buffer_copy(o)
        big.max_tokens = 400
        run("context_overflow", img, b"Describe it." * 1, big)
        bad = o.__class__.from_buffer_copy(o)
        bad.judge = 77
        run("unknown_judge", img, b"q", bad)
        bad.judge, bad.top_p = 0, 0.0
        run("bad_top_p", img, b"q", bad)
        run("still_works", img, b"What is this?")
        status("close", lib.ecso_close(h))
        status("close_again", lib.ecso_close(h))
        run("after_close", img, b"What is this?")
        out["engine_json_after_close"] = json.loads(lib.ecso_engine_json(h).decode())["engine"]
        lib.ecso_free(h)
    """, model=demo_files[0], mmproj=demo_files[1], street=str(street_png), not_image=str(not_image))
    INPUT, IMAGE, OVERFLOW, CLOSED = 1, 2, 4, 6
    assert out["open"][0] == 0
    expected = {"null_query": INPUT, "empty_query": INPUT, "invalid_utf8_query": INPUT, "no_path_no_data": INPUT,
                "missing_image": IMAGE, "not_an_image": IMAGE, "garbage_bytes": IMAGE, "rgb_size_mismatch": IMAGE,
                "rgb_too_large": IMAGE, "unknown_image_kind": INPUT, "image_from_newer_header": INPUT,
                "context_overflow": OVERFLOW, "unknown_judge": INPUT, "bad_top_p": INPUT, "still_works": 0,
                "after_close": CLOSED}
    for name, code in expected.items():
        assert out[name][0] == code, (name, out[name])
        assert out[name][2] is (code != 0), f"{name}: a result only on success"
    assert "more than the context of 512" in out["context_overflow"][1]
    assert "UTF-8" in out["invalid_utf8_query"][1] and "upgrade libecso" in out["image_from_newer_header"][1]
    assert "closed" in out["after_close"][1] and out["close"][0] == out["close_again"][0] == 0
    assert out["engine_json_after_close"] == "native"


def test_python_wrapper_raises_typed_errors(libecso, demo_files, street_png):
    with pytest.raises(ModelError, match="not found"):
        NativeEngine(EngineConfig(model="/nonexistent.gguf"), libecso)
    native = NativeEngine(EngineConfig(model=demo_files[0], mmproj=demo_files[1], n_ctx=512), libecso)
    with pytest.raises(InputError, match="empty"):
        native.run(street_png, " ")
    with pytest.raises(ImageError):
        native.run(b"not an image", "q")
    with pytest.raises(ContextOverflowError):
        native.run(street_png, "q", EcsoOptions(max_tokens=1000))
    native.close()
    with pytest.raises(EngineError, match="closed"):
        native.run(street_png, "q")


def _jpeg_header(width: int, height: int) -> bytes:
    """A JPEG that is only SOI and a baseline SOF0 for one 8-bit component: it declares its size, nothing more."""
    return b"\xff\xd8\xff\xc0" + struct.pack(">HBHHBBBB", 11, 8, height, width, 1, 1, 0x11, 0)


@pytest.mark.parametrize("dims,encoded", [("8000x8000", crafted_png(8000, 8000, b"", color_type=2)),
                                          ("9000x5000", _jpeg_header(9000, 5000))], ids=["png", "jpeg"])
def test_an_image_whose_header_declares_over_40_megapixels_is_refused_by_both_engines_before_decoding(
        dims, encoded, libecso, demo_files, demo_engine):
    # stb_image allocates what a header declares (a few hundred bytes can ask for gigabytes), so the native engine
    # reads the header first, as the Python engine does with Pillow; the message names the declared size
    native = NativeEngine(EngineConfig(model=demo_files[0], mmproj=demo_files[1], n_ctx=512), libecso)
    try:
        with pytest.raises(ImageError, match=f"{dims}.*downscale it first"):
            native.run(encoded, "What is this?", EcsoOptions(max_tokens=2))
        with pytest.raises(ImageError) as small:  # a small header without pixels: undecodable, not too large
            native.run(crafted_png(8, 8, b"", color_type=2), "What is this?", EcsoOptions(max_tokens=2))
        assert "downscale" not in str(small.value)
    finally:
        native.close()
    with pytest.raises(ImageError, match=f"{dims}.*downscale it first"):
        run(demo_engine, encoded, "What is this?", EcsoOptions(max_tokens=2))


def test_cancel_from_another_thread_stops_the_request_and_the_engine_serves_on(libecso, demo_files, street_png):
    native = NativeEngine(EngineConfig(model=demo_files[0], mmproj=demo_files[1], n_ctx=2048), libecso)
    tokens: list[str] = []
    started = threading.Event()

    def on_event(kind, step, text, *_):
        if kind == "token":
            tokens.append(text)
            if len(tokens) == 3:
                started.set()

    def cancel_when_streaming():
        started.wait(120)
        native.cancel()

    t = threading.Thread(target=cancel_when_streaming)
    t.start()
    with pytest.raises(NativeCancelled, match="cancelled"):
        native.run(street_png, "Tell a very long story about this picture.",
                   EcsoOptions(max_tokens=400, judge="append-logit"), on_event)
    t.join()
    assert 3 <= len(tokens) < 400
    r = native.run(street_png, "And now?", EcsoOptions(max_tokens=4))  # a cancel does not stick to the next request
    assert r["steps"][0]["generated_tokens"] >= 1
    native.close()


def test_requests_from_two_threads_are_serialised_and_identical(libecso, demo_files, street_png):
    native = NativeEngine(EngineConfig(model=demo_files[0], mmproj=demo_files[1], n_ctx=2048), libecso)
    results: list[dict] = []
    opts = EcsoOptions(max_tokens=12, judge="append-logit", reuse=False)

    def work():
        results.append(native.run(street_png, "What is happening here?", opts))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    native.close()
    assert len(results) == 2
    assert results[0]["answer"] == results[1]["answer"] and results[0]["judge_score"] == results[1]["judge_score"]


def test_close_from_another_thread_cancels_the_running_request(libecso, demo_files, street_png):
    native = NativeEngine(EngineConfig(model=demo_files[0], mmproj=demo_files[1], n_ctx=2048), libecso)
    streaming = threading.Event()

    def on_event(kind, *_):
        if kind == "token":
            streaming.set()

    closer = threading.Thread(target=lambda: (streaming.wait(120), native.close()))
    closer.start()
    with pytest.raises(NativeCancelled):
        native.run(street_png, "Tell a very long story about this picture.", EcsoOptions(max_tokens=400), on_event)
    closer.join()
    with pytest.raises(EngineError, match="closed"):
        native.run(street_png, "q")


def test_ecso_native_cli_prints_the_same_json_result_as_ecso_run(libecso, demo_files, street_png):
    from conftest import run_cli

    args = ["--image", str(street_png), "--max-tokens", "8", "--judge", "append-logit", "--ctx", "2048", "--json",
            "What is happening here?"]
    py = run_cli("ecso-run", "--model", demo_files[0], "--mmproj", demo_files[1], *args)
    nat = run_cli(str(libecso.parent / "ecso-native"), "--model", demo_files[0], "--mmproj", demo_files[1], *args)
    assert py.returncode == 0 and nat.returncode == 0, nat.stderr + py.stderr
    p, n = json.loads(py.stdout), json.loads(nat.stdout)
    assert {k: n[k] for k in ("answer", "unsafe", "judge", "judge_reply", "image_encodes")} == \
        {k: p[k] for k in ("answer", "unsafe", "judge", "judge_reply", "image_encodes")}
    assert set(p) <= set(n) | {"engine"} and n["judge_score"] == pytest.approx(p["judge_score"], abs=1e-9)
    bad = run_cli(str(libecso.parent / "ecso-native"), "--model", "/nonexistent.gguf", "q")
    assert bad.returncode == 3 and bad.stderr.startswith("ecso-native: error: model file not found")


def test_ecso_native_conversation_flags_match_the_python_api_history(libecso, demo_engine, demo_files, street_png):
    from conftest import run_cli
    from ecso.runtime import Message

    turns = [("--system", "system", "Answer briefly."), ("--user", "user", "Hi."),
             ("--assistant", "assistant", "Hello! What can I do?")]
    flags = [x for flag, _, text in turns for x in (flag, text)]
    nat = run_cli(str(libecso.parent / "ecso-native"), "--model", demo_files[0], "--mmproj", demo_files[1],
                  "--image", str(street_png), "--max-tokens", "8", "--judge", "append-logit", "--ctx", "2048",
                  "--json", *flags, "What is happening here?")
    assert nat.returncode == 0, nat.stderr
    demo_engine.reset()
    demo_engine.image_cache.clear()
    py = run(demo_engine, street_png, "What is happening here?", EcsoOptions(max_tokens=8, judge="append-logit"),
             history=[Message(role, text) for _, role, text in turns])
    n = json.loads(nat.stdout)
    assert (n["answer"], n["unsafe"]) == (py.answer, py.unsafe)
    assert n["judge_score"] == pytest.approx(py.judge_score, abs=1e-9)
    assert n["steps"][0]["prompt_positions"] == py.steps[0].prompt_positions
