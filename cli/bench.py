"""`ecso bench`: ECSO's cost as side-by-side ratios (safe path / plain, reuse / no reuse, decode speed)."""

from __future__ import annotations

import json

import click

from ecso.cli.common import backend_options, engine_config, friendly_errors, model_options, remote_config


@click.command("bench")
@model_options
@backend_options
@click.option("--image", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Image to use (default: examples/street.png, or a generated 448x336 image).")
@click.option("--repeats", type=int, default=5, show_default=True, help="Rounds; ratios are medians over rounds.")
@click.option("--max-tokens", type=int, default=64, show_default=True, help="Answer length (greedy).")
@click.option("--image-size", type=int, default=None,
              help="Demo model only: projector image size; 336 gives LLaVA-1.5's 576 image tokens "
                   "(default: the demo's 224 -> 256 tokens).")
@click.option("--parallel", type=click.IntRange(1, 64), default=1, show_default=True,
              help="N > 1: measure eval throughput with N requests decoded together against one at a time, and "
                   "decode tok/s against llama.cpp's batched ceiling (instead of the cost ratios).")
@click.option("--requests", "n_requests", type=int, default=8, show_default=True,
              help="--parallel: requests per side (different queries, each with its own image).")
@click.option("--json", "as_json", type=click.Path(dir_okay=False), default=None, help="Also write the report here.")
@click.option("--native/--no-native", default=None,
              help="Also measure libecso (the native engine) against the Python engine and Llama "
                   "(default: when libecso is built; see docs/native.md).")
@click.option("--native-lib", type=click.Path(dir_okay=False), default=None, help="Path of libecso to measure.")
@friendly_errors
def command(image, repeats, max_tokens, image_size, parallel, n_requests, as_json, native, native_lib,
            backend, backend_model, backend_timeout, backend_retries, **model_kw) -> None:
    """Measure what ECSO costs on this machine, side by side in one run, and print ratios against targets.

    \b
    safe/plain <judge>    ECSO whose judge finds the answer safe vs the same engine without ECSO
    full reuse/no-reuse   all four steps with KV + embedding reuse vs the naive way (re-encode every step)
    decode tok/s          our engine vs llama-cpp-python's Llama on the same GGUF
    native/python         libecso vs the Python engine: request time, per-request overhead, decode tok/s

    With --parallel N: requests/min with N requests decoded together vs one at a time (full and safe path),
    aggregate decode tok/s vs llama.cpp's N-wide batched decode, and how often the answers are identical.

    With --backend URL --backend-model NAME: the same steps through that OpenAI-compatible server: safe path and
    full path against plain generation there, and eval throughput with 1, 2 and 4 requests in flight (start the
    server with 4 slots, e.g. `llama-server -np 4`).
    """
    import io
    from pathlib import Path

    from PIL import Image

    from ecso.eval.speed import run_bench
    from ecso.runtime import Engine

    remote = remote_config(backend, backend_model, backend_timeout, backend_retries)
    if remote is not None:
        _bench_backend(remote, image, repeats, max_tokens, n_requests, as_json)
        return
    if image_size is not None:
        if model_kw["model"] != "demo" or model_kw["mmproj"]:
            raise click.UsageError("--image-size applies to the demo model only")
        from ecso.models.demo import demo_mmproj_path
        from ecso.models.registry import cache_root

        model_kw["mmproj"] = str(demo_mmproj_path(cache_root(), image_size))
    if image is None:
        example = Path(__file__).resolve().parent.parent / "examples" / "street.png"
        if example.exists():
            image = str(example)
        else:
            buf = io.BytesIO()
            Image.new("RGB", (448, 336), (120, 160, 200)).save(buf, "PNG")
            image = buf.getvalue()
    cfg = engine_config(**model_kw)
    if parallel > 1:
        import dataclasses

        from ecso.eval.throughput import run_throughput_bench

        images = [image]
        typo = Path(__file__).resolve().parent.parent / "examples" / "typo.png"
        if typo.exists():
            images.append(str(typo))
        with Engine(dataclasses.replace(cfg, parallel=parallel)) as engine, Engine(cfg) as sequential:
            report = run_throughput_bench(engine, sequential, images, n_requests=n_requests, max_tokens=max_tokens,
                                          progress=lambda m: click.echo(f"[bench] {m}", err=True))
            from ecso.eval.speed import device_report

            device = device_report(engine)
        click.echo(report.table())
        click.echo(f"backend: {device['backend']} ({', '.join(device['devices'] or []) or 'CPU'})"
                   + (f"\nnote: {device['note']}" if device.get("note") else ""))
        if as_json:
            with open(as_json, "w") as f:
                json.dump({**report.to_dict(), "device": device}, f, indent=2)
        return
    from ecso.runtime.errors import ModelError
    from ecso.runtime.libecso import find_library

    native_auto = native is None
    if native_auto:
        try:
            find_library(native_lib)
            native = True
        except ModelError:
            native = False
            click.echo("[bench] libecso not built: skipping the native engine (see docs/native.md)", err=True)
    say = lambda m: click.echo(f"[bench] {m}", err=True)  # noqa: E731
    native_report = None
    with Engine(cfg) as engine:
        report = run_bench(engine, image, repeats=repeats, max_tokens=max_tokens, progress=say)
        if native:
            from ecso.eval.speed_native import run_native_bench

            try:
                native_report = run_native_bench(engine, image, native_lib, repeats=repeats,
                                                 max_tokens=max_tokens, progress=say)
            except ModelError as e:  # e.g. a chat template the native engine cannot render
                if not native_auto:
                    raise
                say(f"skipping the native engine: {e}")
    click.echo(report.table())
    if native_report is not None:
        click.echo("")
        click.echo(native_report.table())
    if as_json:
        d = report.to_dict()
        if native_report is not None:
            d["native"] = native_report.to_dict()
        with open(as_json, "w") as f:
            json.dump(d, f, indent=2)


def _bench_backend(remote, image, repeats: int, max_tokens: int, n_requests: int, as_json) -> None:
    """`ecso bench --backend`: the cost ratios and the eval throughput through the server (eval/remote_speed.py)."""
    from pathlib import Path

    from ecso.eval.remote_speed import run_remote_bench

    if image is None:
        image = str(Path(__file__).resolve().parent.parent / "examples" / "street.png")
    report = run_remote_bench(remote, image, repeats=repeats, max_tokens=max_tokens, n_requests=n_requests,
                              progress=lambda m: click.echo(f"[bench] {m}", err=True))
    click.echo(report.table())
    if as_json:
        with open(as_json, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
