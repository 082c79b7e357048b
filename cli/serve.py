"""`ecso serve`: a local OpenAI-compatible server with ECSO and a page to watch it (thin wrapper over ecso.server)."""

from __future__ import annotations

import dataclasses
import importlib.util
import signal
from pathlib import Path

import click

from ecso.runtime.prompts import JUDGE_NAMES as SELF_JUDGES

from ecso.cli.common import backend_options, engine_config, friendly_errors, model_options, remote_config


@click.command("serve", context_settings={"help_option_names": ["-h", "--help"]})
@model_options
@backend_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback needs --api-key.")
@click.option("--port", type=int, default=8080, show_default=True, help="Port (0: any free port, printed at start).")
@click.option("--api-key", envvar="ECSO_API_KEY", default=None,
              help="Require `Authorization: Bearer KEY` on /v1 (env ECSO_API_KEY keeps it out of `ps`).")
@click.option("--name", "model_name", default=None,
              help="Model id shown to clients (default: the registry name or the GGUF file stem).")
@click.option("--max-tokens", type=int, default=512, show_default=True,
              help="Answer length when a request gives no max_tokens.")
@click.option("--judge", type=click.Choice(SELF_JUDGES), default="paper",
              show_default=True, help="Default judge (a request may override it with \"ecso\": {\"judge\": ...}).")
@click.option("--rule", "decision_rule", type=click.Choice(["exact", "contains"]), default="exact",
              show_default=True, help="How the judge's reply is read (exact = the paper's rule).")
@click.option("--stream-mode", type=click.Choice(["held", "live"]), default="held", show_default=True,
              help="held: a streamed first answer is held back until the judge clears it (nothing unsafe is "
                   "ever sent); live: stream at once, and if judged unsafe say so and stream the new answer.")
@click.option("--parallel", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Slots: requests run at once, each on its own KV sequence, sharing every decode step "
                   "(throughput; replies can differ from a lone run in the last bits, see docs/engine.md). "
                   "1: one request at a time, exactly as `ecso-run`.")
@click.option("--max-waiting", type=int, default=8, show_default=True,
              help="Requests that may wait while every slot is busy; more get 429 at once.")
@click.option("--queue-timeout", type=float, default=300.0, show_default=True,
              help="Seconds a request may wait for the model before a 503.")
@click.option("--max-body-mb", type=float, default=32.0, show_default=True, help="Request body limit (413 above).")
@click.option("--max-image-mb", type=float, default=20.0, show_default=True, help="Image size limit (413 above).")
@click.option("--image-cache", type=int, default=16, show_default=True,
              help="Encoded images kept in memory (LRU), so follow-up questions on an image skip the encoder.")
@click.option("--allow-file-dir", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Accept file:// image URLs under this directory (repeatable). Default: refused.")
@click.option("--allow-domain", multiple=True,
              help="Fetch http(s) image URLs from this host (`.example.com`: and its subdomains; repeatable). "
                   "Default: refused.")
@click.option("--allow-host", multiple=True, help="Extra Host header name to accept (DNS-rebinding protection "
              "accepts only loopback names by default; repeatable).")
@click.option("--read-timeout", type=float, default=30.0, show_default=True,
              help="Seconds a client may take to send its request headers, and again its body (then 408).")
@click.option("--quiet", is_flag=True, help="No per-request log lines.")
@friendly_errors
def command(host, port, api_key, model_name, max_tokens, judge, decision_rule, stream_mode, parallel, max_waiting,
            queue_timeout, max_body_mb, max_image_mb, image_cache, allow_file_dir, allow_domain, allow_host,
            read_timeout, quiet, backend, backend_model, backend_timeout, backend_retries, **model_kw):
    """Serve the model as an OpenAI-compatible API with ECSO on every answer.

    \b
    Open http://127.0.0.1:8080/ in a browser to watch ECSO work: ask about an image and see the four steps,
    their timings, the verdict, the judge's reply, the caption and any retraction live.

    \b
    Endpoints: POST /v1/chat/completions (text + image_url data: URIs, streaming or not), GET /v1/models,
    GET /health. Replies carry an extra `ecso` object (verdict, judge reply, caption, timings) that OpenAI
    clients ignore. Point any OpenAI client at http://127.0.0.1:8080/v1 (any api key unless --api-key is set).

    \b
    Examples:
      ecso serve                                   # the demo model on 127.0.0.1:8080
      ecso serve --model llava-1.5-7b --port 8000
      ecso serve --parallel 4                      # 4 requests at once, batched
      ecso serve --model llm.gguf --mmproj mmproj.gguf --api-key "$KEY"
      ecso serve --backend http://127.0.0.1:8081/v1 --backend-model NAME   # a gateway in front of llama-server

    With --backend, ECSO's steps run on that OpenAI-compatible server (llama-server, vLLM, Ollama, LM Studio) and
    this server adds ECSO with all its guarantees (held streaming, limits, queue, API key, loopback default).
    """
    _require_server_extra()
    from ecso.runtime import EcsoOptions, Engine
    from ecso.runtime.remote import RemoteModel
    from ecso.server import EcsoServer, MediaPolicy, ServerConfig

    options = EcsoOptions(judge=judge, decision_rule=decision_rule, max_tokens=max_tokens,
                          caption_max_tokens=max_tokens)
    options.validate()
    remote = remote_config(backend, backend_model, backend_timeout, backend_retries, parallel=parallel)
    name = model_name or (backend_model if remote else _model_name(model_kw["model"]))
    media = MediaPolicy(max_image_bytes=int(max_image_mb * 1024 * 1024), allow_file_dirs=tuple(allow_file_dir),
                        allow_domains=tuple(allow_domain))
    config = ServerConfig(host=host, port=port, model_name=name, api_key=api_key or None,
                          max_body_bytes=int(max_body_mb * 1024 * 1024), max_waiting=max_waiting,
                          queue_timeout=queue_timeout, read_timeout=read_timeout, stream_mode=stream_mode,
                          allowed_hosts=tuple(allow_host), media=media, log=not quiet)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it as cleanly as Ctrl-C
    if remote is not None:
        model = RemoteModel(remote)
    else:
        model = Engine(dataclasses.replace(engine_config(**model_kw), image_cache_entries=image_cache,
                                           parallel=parallel))
    with model as engine:
        server = EcsoServer(engine, options, config)
        slots = f"{parallel} slots, " if parallel > 1 else ""
        via = f"gateway to {remote.url}, " if remote is not None else ""
        click.echo(f"ecso: serving {name} at {server.url} ({via}{slots}OpenAI-compatible; the page: "
                   f"{server.url[:-3]}/ ; Ctrl-C to stop)")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            click.echo("ecso: stopped")
        finally:
            server.close()


SERVER_MODULES = ("starlette", "sse_starlette", "uvicorn", "pydantic")


def _require_server_extra() -> None:
    """`ecso serve` needs the server extra; say exactly what to install instead of an ImportError."""
    missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        from ecso.runtime.errors import EcsoError

        raise EcsoError(f"ecso serve needs the server extra ({', '.join(missing)} not installed): "
                        "pip install 'ecso[server]'")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _model_name(model: str) -> str:
    """The registry name as given, or the file stem of a GGUF path."""
    if model.endswith(".gguf") or Path(model).exists():
        return Path(model).stem
    return model
