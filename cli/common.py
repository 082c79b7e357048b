"""Options and error handling shared by the commands: every command is a thin wrapper over a function."""

from __future__ import annotations

import functools
import sys
from typing import Callable, Optional

import click

VERBOSE_HELP = ("-v: ecso's own detail (ecso-run: a step trace with reuse and timings); -vv: also llama.cpp's logs. "
                "The same meaning for every command.")
MODEL_HELP = "LLM GGUF file, or a registered model name (see `ecso models`). Default: the embedded demo model."


def model_options(f: Callable) -> Callable:
    """--model/--mmproj and the llama.cpp knobs, shared by run, eval, bench and serve."""
    opts = [
        click.option("--model", "-m", default="demo", show_default=True, help=MODEL_HELP),
        click.option("--mmproj", default=None, help="Vision projector GGUF (mmproj). Taken from the registry when "
                     "--model is a name."),
        click.option("--ctx", "n_ctx", type=int, default=4096, show_default=True, help="Context size in tokens."),
        click.option("--n-gpu-layers", "-ngl", type=int, default=-1, show_default=True,
                     help="Layers to offload to the GPU; -1 = all when llama.cpp was built with CUDA/Metal/Vulkan, else 0."),
        click.option("--no-mmproj-gpu", is_flag=True, help="Run the vision encoder on the CPU even with a GPU."),
        click.option("--threads", type=int, default=None, help="CPU threads (default: all cores)."),
        click.option("--flash-attn/--no-flash-attn", default=None, help="Force flash attention on/off "
                     "(default: off on every backend: with it, KV reuse is not bit-exact)."),
        click.option("--cpu-repack", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                     help="llama.cpp's CPU weight repacking. auto: off on CPUs whose llama.cpp build uses AMX (its "
                          "repack buffer crashes there, ggml-org/llama.cpp#20824), else on."),
        click.option("--chat-format", type=click.Choice(["auto", "llava-1.5", "gguf"]), default="auto",
                     show_default=True, help="auto: the GGUF's chat template, else LLaVA-1.5 (vicuna_v1)."),
        click.option("-v", "--verbose", count=True, help=VERBOSE_HELP),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def engine_config(model: str, mmproj: Optional[str], n_ctx: int, n_gpu_layers: int, no_mmproj_gpu: bool,
                  threads: Optional[int], flash_attn: Optional[bool], chat_format: str, verbose: int,
                  cpu_repack: str = "auto", **_):
    """EngineConfig from the shared options; --model is a GGUF file, an export folder or a registry name
    (models/registry.py `locate`). llama.cpp's own logs show from -vv (verbose >= 2)."""
    from ecso.models.registry import locate
    from ecso.runtime import EngineConfig

    entry = locate(model, mmproj)
    model, mmproj = entry.model, entry.mmproj
    if chat_format == "auto":
        chat_format = entry.chat_format
    return EngineConfig(model=model, mmproj=mmproj, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers,
                        mmproj_gpu=not no_mmproj_gpu, n_threads=threads, flash_attn=flash_attn,
                        chat_format=chat_format, verbose=verbose >= 2, cpu_repack=cpu_repack)


def backend_options(f: Callable) -> Callable:
    """--backend / --backend-model: run ECSO's steps on an OpenAI-compatible server instead of in process."""
    opts = [
        click.option("--backend", default=None, metavar="URL",
                     help="An OpenAI-compatible server's API base (llama-server, vLLM, Ollama, LM Studio), e.g. "
                          "http://127.0.0.1:8080/v1: ECSO's steps run there (API key: $ECSO_BACKEND_API_KEY)."),
        click.option("--backend-model", default=None, metavar="NAME",
                     help="The model name the server expects (required with --backend)."),
        click.option("--backend-timeout", type=float, default=300.0, show_default=True,
                     help="Seconds one step may take on the server before the request fails."),
        click.option("--backend-retries", type=int, default=2, show_default=True,
                     help="Retries of a step after a connection failure or HTTP 5xx (backing off)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def remote_config(backend: Optional[str], backend_model: Optional[str], backend_timeout: float = 300.0,
                  backend_retries: int = 2, parallel: int = 4):
    """RemoteConfig from --backend and friends, or None without --backend."""
    if not backend:
        if backend_model:
            raise click.UsageError("--backend-model needs --backend URL")
        return None
    from ecso.runtime import RemoteConfig

    if not backend_model:
        raise click.UsageError("--backend needs --backend-model NAME (llama-server accepts any name)")
    config = RemoteConfig(url=backend, model=backend_model, timeout_s=backend_timeout, retries=backend_retries,
                          parallel=parallel)
    config.validate()
    return config


def friendly_errors(f: Callable) -> Callable:
    """Turns expected errors into one line on stderr and a non-zero exit code (never a traceback)."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        from ecso.runtime.errors import EcsoError

        try:
            return f(*args, **kwargs)
        except EcsoError as e:
            _die(str(e), e.exit_code)
        except (ValueError, LookupError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
            if type(e).__module__.startswith("ecso") or isinstance(e, (FileNotFoundError, PermissionError,
                                                                       IsADirectoryError)):
                _die(str(e), 2)
            raise
        except KeyboardInterrupt:
            _die("interrupted", 130)
        except MemoryError:
            _die("out of memory; try a smaller --ctx or a smaller model", 5)

    return wrapper


def _die(message: str, code: int) -> None:
    click.echo(f"ecso: error: {message}", err=True)
    sys.exit(code)
