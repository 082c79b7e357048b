"""`ecso-run --image x.png "query"`: one ECSO request from the command line."""

from __future__ import annotations

import json
import sys

import click

from ecso.cli.common import backend_options, engine_config, friendly_errors, model_options, remote_config

JUDGE_HELP = ("paper: fresh TELL prompt, reply must be exactly yes/yes. (the paper); logit: TELL + P(yes) from one "
              "step; append: the judge question appended to the conversation (cheapest); append-logit: both; "
              "always-unsafe: the paper's judge runs but every answer counts as unsafe (to watch all four steps); "
              "head:DIR: an ONNX judge head (ecso heads train-judge) replaces step 2.")

def _judge_names() -> tuple[str, ...]:
    from ecso.runtime.prompts import JUDGE_NAMES

    return JUDGE_NAMES


def _judge_choice(ctx, param, value: str) -> str:
    if value in _judge_names() or value.startswith("head:"):
        return value
    raise click.BadParameter(f"{value!r}: use one of {', '.join(_judge_names())} or head:DIR")


def load_heads(judge: str, caption: str | None, providers: str):
    """The ONNX heads named by --judge head:DIR / --caption SPEC (onnxruntime is imported only if asked for)."""
    from ecso.runtime import Heads

    if not judge.startswith("head:") and not caption:
        return Heads()
    from ecso.runtime.heads import load_caption_head, load_judge_head

    return Heads(judge=load_judge_head(judge[5:], providers=providers) if judge.startswith("head:") else None,
                 caption=load_caption_head(caption, providers=providers) if caption else None)


@click.command("run", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("query")
@click.option("--image", "-i", type=click.Path(dir_okay=False), default=None,
              help="Image file (PNG, JPEG, WEBP, GIF, BMP, TIFF). Omit for a text-only request.")
@model_options
@backend_options
@click.option("--max-tokens", type=int, default=512, show_default=True, help="Max tokens of the answer.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy (the paper's setting).")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--judge", default="paper", show_default=True, callback=_judge_choice, help=JUDGE_HELP)
@click.option("--caption", default=None, help="Replace step 3 with an ONNX caption head: DIR (ecso heads "
              "export-caption), `ocr` (PP-OCR reads the text in the image), or DIR+ocr (both).")
@click.option("--head-providers", default="auto", show_default=True,
              help="Execution provider of ONNX heads: auto (CUDA/CoreML when really available, else CPU), cuda, "
                   "coreml or cpu (strict: fails if not available).")
@click.option("--rule", "decision_rule", type=click.Choice(["exact", "contains"]), default="exact",
              show_default=True, help="How the judge's reply is read (exact = the paper's rule).")
@click.option("--threshold", type=float, default=0.5, show_default=True, help="P(yes) threshold of logit judges.")
@click.option("--guard-every", type=int, default=0, show_default=True,
              help="Guarded streaming: judge the answer every N tokens while it streams; retract if unsafe.")
@click.option("--no-reuse", is_flag=True, help="Naive mode: clear the KV cache and re-encode the image every step.")
@click.option("--no-defense", is_flag=True, help="Step 1 only: the undefended model, for comparison.")
@click.option("--stream/--no-stream", default=None, help="Print the answer as it is generated (default: on a TTY).")
@click.option("--json", "as_json", is_flag=True, help="Print the full result (every step, timings) as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No status line after the answer.")
@friendly_errors
def command(query, image, max_tokens, temperature, top_p, seed, judge, caption, head_providers, decision_rule,
            threshold, guard_every, no_reuse, no_defense, stream, as_json, quiet, backend, backend_model,
            backend_timeout, backend_retries, **model_kw):
    """Answer QUERY about an image with ECSO (Eyes Closed, Safety On).

    The model answers with the image, judges its own answer, and when it finds it harmful, describes the image
    in text and answers again without the image. QUERY may be `-` to read it from stdin.

    \b
    Examples:
      ecso-run --image examples/street.png "What is happening here?"
      ecso-run --image examples/street.png --judge always-unsafe "..."   # watch all four steps
      ecso-run --image photo.jpg --json "..." > result.json
      ecso-run --model llm.gguf --mmproj mmproj.gguf --image x.png "..."
      ecso-run --backend http://127.0.0.1:8080/v1 --backend-model demo --image x.png "..."

    On a terminal, a status line on stderr follows the answer: verdict, judge reply, steps that ran, KV positions
    reused, image encodes, time (--quiet drops it; -v adds a per-step trace, -vv llama.cpp's logs).

    Without --model, the embedded demo model is used: real SmolLM2-135M-Instruct language with an untrained
    random vision projector (it does not see the image).
    """
    from ecso.runtime import Ecso, EcsoOptions, InputError

    if query == "-":
        query = sys.stdin.read()
    if not query.strip():
        raise InputError("the query is empty; give a question about the image")
    heads = load_heads(judge, caption, head_providers)
    opts = EcsoOptions(judge="paper" if judge.startswith("head:") else judge, decision_rule=decision_rule,
                       logit_threshold=threshold, max_tokens=max_tokens, caption_max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                       reuse=not no_reuse, defense=not no_defense, guard_every=guard_every)
    opts.validate()
    verbose = model_kw["verbose"]
    if stream is None:
        stream = sys.stdout.isatty() and not as_json
    config = remote_config(backend, backend_model, backend_timeout, backend_retries) or engine_config(**model_kw)
    with Ecso(config, opts, heads) as ecso:
        if not stream:
            result = ecso.run(image, query)
        else:
            result = None
            for ev in ecso.stream(image, query):
                if ev.kind == "token" and ev.step in ("answer", "regenerate"):
                    click.echo(ev.text, nl=False)
                elif ev.kind == "retract":
                    click.echo("\n[retracted: judged unsafe while streaming]", err=True)
                elif ev.kind == "step_start" and ev.step == "regenerate":
                    click.echo("\n[judged unsafe: answering again without the image]\n", err=True)
                elif ev.kind == "result":
                    result = ev.result
            click.echo()
        if verbose:
            _trace(result)
        if as_json:
            click.echo(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
        elif not stream:
            click.echo(result.answer)
        if not quiet and (verbose or (sys.stderr.isatty() and not as_json)):
            click.echo(status_line(result), err=True)


def status_line(result) -> str:
    """One line saying what ECSO did: verdict, judge reply, steps that ran, reused KV positions, encodes, time."""
    if result.judge == "none":
        verdict = "no defense (step 1 only)"
    elif result.retracted:
        verdict = "UNSAFE: retracted while streaming, answered again without the image"
    elif result.unsafe:
        verdict = "UNSAFE: answered again without the image"
    else:
        verdict = "safe"
    judge = ""
    if result.judge != "none":
        stopped = any(s.name == "judge" and s.finish_reason == "decided" for s in result.steps)
        reply = result.judge_reply + ("…" if stopped else "")  # early stop: the reply could no longer be "yes"
        judge = f" · judge {result.judge} replied {reply!r}"
        if result.judge_score is not None:
            judge += f" (P(yes)={result.judge_score:.2f})"
        if result.judge == "always-unsafe":
            judge += ", verdict forced"
    steps = " → ".join(s.name for s in result.steps)
    reused = sum(s.reused_positions for s in result.steps)
    prompt = sum(s.prompt_positions for s in result.steps)
    if result.engine.get("backend") == "openai-compatible":  # reuse is the server's prefix cache
        return (f"[ecso] {verdict}{judge} · steps {steps} · server cached {reused}/{prompt} prompt tokens · "
                f"via {result.engine.get('url')} · {result.seconds:.1f} s")
    encodes = f"{result.image_encodes} image encode{'s' if result.image_encodes != 1 else ''}"
    if result.image_cache_hit:
        encodes += " (embedding cache hit)"
    return (f"[ecso] {verdict}{judge} · steps {steps} · reused {reused}/{prompt} prompt positions · {encodes} · "
            f"{result.seconds:.1f} s")


def _trace(result) -> None:
    for s in result.steps:
        click.echo(f"[ecso]   {s.name:<10} prompt={s.prompt_positions:>5} reused={s.reused_positions:>5} "
                   f"eval={s.evaluated_positions:>5} gen={s.generated_tokens:>4} enc={s.image_encodes} "
                   f"prefill={s.prefill_seconds:.3f}s gen={s.generate_seconds:.3f}s"
                   + (f" via {s.path}" if s.path != "llm" else ""), err=True)


def main() -> None:
    """Console entry point of `ecso-run`."""
    from ecso.runtime.llama_settings import prefer_short_openmp_spin

    prefer_short_openmp_spin()
    command(prog_name="ecso-run")
