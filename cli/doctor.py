"""`ecso doctor`: everything a bug report needs, and a smoke run that survives a native crash."""

from __future__ import annotations

import sys
from pathlib import Path

import click


def _line(label: str, value) -> str:
    return f"  {label:<22} {value}"


def render(report) -> str:
    v, out = report.versions, []
    out.append("versions")
    out.append(_line("ecso", v.get("ecso")))
    out.append(_line("llama-cpp-python", v.get("llama-cpp-python")))
    out.append(_line("llama.cpp (ggml)", f"{v.get('ggml_version', '?')} commit {v.get('ggml_commit', '?')}"))
    out.append(_line("python", v.get("python")))
    p = report.platform
    out.append("system")
    out.append(_line("platform", f"{p['system']} {p['release']} {p['machine']}"))
    out.append(_line("CPU flags", " ".join(report.cpu_flags) or "(not readable here)"))
    out.append("llama.cpp build")
    out.append(_line("backends", ", ".join(report.backends) or "(none)"))
    feats = report.llama_features
    shown = [k for k in ("AMX_INT8", "AVX512", "AVX2", "NEON", "OPENMP", "REPACK") if k in feats]
    out.append(_line("CPU features used", " ".join(f"{k}={feats[k]}" for k in shown) or "(none reported)"))
    for k in ("CUDA", "METAL", "Metal", "VULKAN"):
        if any(b.upper() == k.upper() for b in report.backends):
            out.append(_line(k.lower(), "compiled in"))
    gpu_built = any(b not in ("CPU", "BLAS", "RPC") for b in report.backends)
    out.append(_line("GPU offload", "yes" if report.gpu_offload else
                     "no (no GPU device found)" if gpu_built else "no (CPU-only build)"))
    out.extend(device_lines(report))
    cr = report.cpu_repack
    out.append(_line("cpu repack (auto)", f"{'on' if cr['enabled'] else 'off'}: {cr['reason']}"))
    ort = report.onnxruntime
    out.append("onnxruntime")
    if not ort.get("installed"):
        out.append(_line("installed", f"no ({ort['hint']})"))
    elif "error" in ort:
        out.append(_line("error", ort["error"]))
    else:
        out.append(_line("version", ort["version"]))
        out.append(_line("providers", ", ".join(ort["providers"])))
    dm = report.demo_model
    out.append("demo model")
    out.append(_line("installed", f"yes ({dm['llm']})" if dm["installed"] else f"no: {dm['hint']}"))
    if report.smoke is not None:
        s = report.smoke
        out.append("smoke run (child process)")
        out.append(_line("result", ("ok: " if s.ok else "FAILED: ") + s.message))
    return "\n".join(out)


def device_lines(report) -> list[str]:
    """Every device (backend, type, memory), a hint when a GPU backend is built in but shows no device, and where
    a model's layers would go with -ngl -1."""
    out = []
    for d in report.devices:
        mem = f", {d.memory_total_mb} MiB ({d.memory_free_mb} MiB free)" if d.memory_total_mb else ""
        out.append(_line(f"device {d.name}", f"{d.backend or '?'} {d.type}: {d.description}{mem}"))
    for backend in report.backends:
        if backend not in ("CPU", "BLAS", "RPC") and not any(d.backend == backend for d in report.devices):
            hint = (": a CPU-type Vulkan device (Mesa lavapipe) is used only when GGML_VK_VISIBLE_DEVICES names "
                    "it, e.g. GGML_VK_VISIBLE_DEVICES=0" if backend == "Vulkan" else "")
            out.append(_line(f"{backend} devices", f"none found{hint}"))
    o = report.offload
    if o:
        if "error" in o:
            out.append(_line("offload (-ngl -1)", o["error"]))
        else:
            where = ", ".join(o["devices"]) or "CPU"
            fit = ""
            if "weights_fit" in o:
                fit = (f"; weights {o['weights_mb']} MiB, {o['devices_free_mb']} MiB free: "
                       + ("fit" if o["weights_fit"] else "DO NOT FIT, lower -ngl"))
            out.append(_line("offload (-ngl -1)", f"{o['layers_offloaded']} layers of {Path(o['model']).name} on {where}{fit}"))
    return out


@click.command("doctor", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (attach it to a bug report).")
@click.option("--no-smoke", is_flag=True, help="Skip the smoke run of the engine.")
@click.option("--cpu-repack", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="CPU-repack setting for the smoke run (see ecso-run --help).")
@click.option("--model", "offload_model", type=click.Path(exists=True, dir_okay=False), default=None,
              help="GGUF model to show the layer offload for (default: the demo model).")
def command(as_json: bool, no_smoke: bool, cpu_repack: str, offload_model) -> None:
    """Report versions, llama.cpp backends, devices and CPU features, ONNX providers and the demo model, then run
    one ECSO request on the demo model in a child process. A native crash there (e.g. SIGSEGV) is reported with
    what to try instead of taking the terminal down. Exit code 1 when the smoke run fails."""
    from ecso.cli.system import system_report

    report = system_report(smoke=not no_smoke, cpu_repack=cpu_repack, offload_model=offload_model)
    click.echo(report.to_json() if as_json else render(report))
    if report.smoke is not None and not report.smoke.ok and report.demo_model["installed"]:
        sys.exit(1)
