"""`ecso eval BENCH --data DIR --out RUN_DIR`: resumable safety evaluation with and without ECSO."""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Optional

import click

from ecso.cli.common import engine_config, friendly_errors, model_options

BENCH_HELP = "mm-safetybench (alias mmsb), vlsafe, vlsbench, or custom (a JSONL of {id, image, query, category})."
JUDGE_HELP = ("Who reads the answers: rule (offline refusal/compliance patterns, default), llm (a local GGUF with the "
              "benchmark's own judge prompt; --judge-model, default the demo model), openai:URL (any "
              "OpenAI-compatible endpoint, e.g. openai:https://api.openai.com/v1 --judge-model gpt-4o), none.")


def _split(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(v.strip() for item in values for v in item.split(",") if v.strip())


def selection_options(f: Callable) -> Callable:
    """Benchmark data and selection, shared by eval and data-engine."""
    opts = [
        click.option("--data", required=False, type=click.Path(exists=True),
                     help="The downloaded benchmark folder (or file), in its official layout."),
        click.option("--images", type=click.Path(exists=True, file_okay=False), default=None,
                     help="VLSafe: the COCO train2017 image folder (default: searched next to the jsonl)."),
        click.option("--limit", type=int, default=None, help="Only the first N samples of the selection."),
        click.option("--category", "--scenario", "categories", multiple=True,
                     help="Repeatable or comma-separated. MM-SafetyBench scenarios by name, number ('01') or "
                          "'ecso' (the paper's 01-07 + 09); VLSBench categories or sub-categories."),
        click.option("--mode", "modes", multiple=True, type=click.Choice(["SD", "SD_TYPO", "TYPO", "text"]),
                     help="MM-SafetyBench image modes (repeatable; default SD, SD_TYPO, TYPO). text: the original "
                          "question without an image."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def generation_options(f: Callable) -> Callable:
    """How the model answers (as in `ecso-run`) and who judges, shared by eval and data-engine."""
    opts = [
        click.option("--max-tokens", type=int, default=512, show_default=True,
                     help="Max tokens of each answer and caption (the paper allows 1024-2048)."),
        click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy (the paper)."),
        click.option("--top-p", type=float, default=1.0, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--parallel", type=click.IntRange(1, 64), default=1, show_default=True,
                     help="Requests decoded together (one llama_decode carries a token of each); 1 = one at a "
                          "time, bit-exact as ecso-run. Records are still written one by one, resumably."),
        click.option("--self-judge", type=click.Choice(["paper", "logit", "append", "append-logit"]),
                     default="paper", show_default=True, help="ECSO's step-2 self-judge (see `ecso-run --help`)."),
        click.option("--rule", "decision_rule", type=click.Choice(["exact", "contains"]), default="exact",
                     show_default=True, help="How the self-judge's reply is read (exact = the paper)."),
        click.option("--threshold", type=float, default=0.5, show_default=True,
                     help="P(yes) threshold of the logit self-judges."),
        click.option("--judge", default=None, help=JUDGE_HELP),
        click.option("--judge-model", default=None,
                     help="llm: GGUF path or registered name (default: demo); openai: the model name."),
        click.option("--judge-max-tokens", type=int, default=None,
                     help="Max tokens of a judge reply (default per benchmark: local 16/384/256, API unset/128)."),
        click.option("--judge-ctx", type=int, default=4096, show_default=True, help="Context of a local judge."),
        click.option("--judge-prompts", type=click.Choice(["official", "ecso"]), default="official",
                     show_default=True, help="MM-SafetyBench: evaluation.py's templates, or ECSO's copy of the "
                                             "safety template (its paper's numbers)."),
        click.option("--judge-text-only", is_flag=True,
                     help="openai judge on VLSBench: send data.json's image description instead of the image."),
        click.option("--force", is_flag=True,
                     help="Continue a run folder made with another model/prompt version/decoding settings."),
        click.option("--retry-errors", is_flag=True, help="Generate again the samples that failed last time."),
        click.option("--no-progress", is_flag=True, help="No progress bars."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def build_config(bench: str, data: Optional[str], out: str, defenses: tuple[str, ...], leakage: bool,
                 kw: dict):
    """EvalConfig from the CLI options (shared by eval and data-engine)."""
    from ecso.eval.runner import EvalConfig, JudgeSpec
    from ecso.runtime import EcsoOptions

    if not data:
        raise click.UsageError("--data DIR is required: the downloaded benchmark folder")
    judge = kw.pop("judge") or ("llm" if kw["judge_model"] else "rule")
    spec = JudgeSpec.parse(judge, kw.pop("judge_model"), max_tokens=kw.pop("judge_max_tokens"),
                           n_ctx=kw.pop("judge_ctx"), prompt_set=kw.pop("judge_prompts"),
                           send_images=not kw.pop("judge_text_only"))
    max_tokens = kw.pop("max_tokens")
    options = EcsoOptions(judge=kw.pop("self_judge"), decision_rule=kw.pop("decision_rule"),
                          logit_threshold=kw.pop("threshold"), max_tokens=max_tokens, caption_max_tokens=max_tokens,
                          temperature=kw.pop("temperature"), top_p=kw.pop("top_p"), seed=kw.pop("seed"))
    engine = dataclasses.replace(engine_config(**kw), parallel=kw.pop("parallel"))
    return EvalConfig(benchmark=bench, data=data, out=out, engine=engine, options=options,
                      defenses=defenses, categories=_split(kw.pop("categories")), modes=tuple(kw.pop("modes")),
                      limit=kw.pop("limit"), images=kw.pop("images"), judge=spec, leakage=leakage,
                      force=kw.pop("force"), retry_errors=kw.pop("retry_errors"), progress=not kw.pop("no_progress"))


def echo_summary(s) -> None:
    click.echo(f"[eval] {s.benchmark}: {s.n_samples} samples ({s.n_input_errors} unusable: missing image or "
               f"malformed row), {s.generated} answers written, {s.reused} already there, "
               f"{s.generation_errors} generation errors, ECSO flagged {s.ecso_flagged}", err=True)
    if s.judge:
        click.echo(f"[eval] judge {s.judge}: {s.judged} judged, {s.judge_errors} failed calls, {s.unparsed} "
                   f"unparsable replies" + (f"; leakage: {s.leakage_judged} queries" if s.leakage_judged else ""),
                   err=True)
    for n in s.notes:
        click.echo(f"[eval] note: {n}", err=True)
    click.echo(f"[eval] {s.seconds:.1f} s; run folder {s.run_dir}", err=True)


@click.command("eval", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bench")
@selection_options
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Run folder: created, or resumed when it exists (answers, judgments, report).")
@click.option("--defense", type=click.Choice(["none", "ecso", "both"]), default="both", show_default=True,
              help="Answer without ECSO, with ECSO, or both side by side (one model pass: the undefended answer "
                   "is ECSO's step 1).")
@click.option("--leakage", is_flag=True,
              help="Also ask the judge about each text query alone (no image): how often is the harm already "
                   "visible in the text (visual safety information leakage)?")
@model_options
@generation_options
@click.option("--no-report", is_flag=True, help="Do not write/print the report at the end.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON instead of the report.")
@friendly_errors
def command(bench, out, defense, leakage, no_report, as_json, **kw):
    """Evaluate safety on BENCH, with and without ECSO, resumably, into --out.

    BENCH: mm-safetybench (alias mmsb), vlsafe, vlsbench, or custom (a JSONL of {id, image, query, category}).

    Killed or interrupted runs continue where they stopped when run again with the same --out (nothing lost,
    nothing doubled). Running again with another --judge re-judges the stored answers without regenerating them.
    A missing image, a malformed row or a failed judge call is recorded and counted as unknown.

    \b
    Examples:
      ecso eval mmsb --data MM-SafetyBench/data --scenario ecso --out runs/mmsb
      ecso eval vlsafe --data VLSafe --images coco/train2017 --out runs/vlsafe --limit 200
      ecso eval vlsbench --data vlsbench --out runs/vls --leakage --judge llm --judge-model guard.gguf
      ecso eval vlsbench --data vlsbench --out runs/vls --judge openai:https://api.openai.com/v1 --judge-model gpt-4o
      ecso report runs/vls
    """
    from dataclasses import asdict

    from ecso.eval.benchmarks import canonical_benchmark
    from ecso.eval.report import write_report
    from ecso.eval.runner import run_eval

    defenses = ("none", "ecso") if defense == "both" else (defense,)
    cfg = build_config(canonical_benchmark(bench), kw.pop("data"), out, defenses, leakage, kw)
    summary = run_eval(cfg)
    echo_summary(summary)
    if as_json:
        click.echo(json.dumps(asdict(summary), indent=2))
    elif not no_report:
        report = write_report(out)
        click.echo(report.markdown)
        click.echo(f"[eval] report: {', '.join(report.files.values())}", err=True)
