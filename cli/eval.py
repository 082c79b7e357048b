"""`ecso eval BENCH --data DIR --out RUN_DIR`: resumable safety evaluation with and without ECSO."""

from __future__ import annotations

import json

import click

from ecso.cli.common import friendly_errors, model_options
from ecso.cli.eval_options import build_config, echo_summary, generation_options, selection_options


@click.command("eval", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bench")
@selection_options
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Run folder: created, or resumed when it exists (answers, judgments, report).")
@click.option("--defense", type=click.Choice(["none", "ecso", "both"]), default="both", show_default=True,
              help="Answer without ECSO, with ECSO, or both side by side (one model pass: the undefended answer "
                   "is ECSO's step 1).")
@click.option("--leakage", is_flag=True,
              help="Visual safety information leakage (ecso's definitions, printed in the report): the judge reads "
                   "each query alone (text-alone harm rate) and, if it sees images, each image + query pair (pair "
                   "harm rate R1, both harmful R2, leak share R2/R1).")
@model_options
@generation_options
@click.option("--no-report", is_flag=True, help="Do not write/print the report at the end.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON instead of the report.")
@friendly_errors
def command(bench, out, defense, leakage, no_report, as_json, **kw):
    """Evaluate safety (or utility) on BENCH, with and without ECSO, resumably, into --out.

    BENCH: mm-safetybench (alias mmsb), vlsafe, vlsbench, custom (a JSONL of {id, image, query, category});
    utility: mme (MME release folder, scored by its rules), benign (a custom JSONL of benign inputs).

    Killed or interrupted runs continue where they stopped when run again with the same --out (nothing lost,
    nothing doubled). Running again with another --judge re-judges the stored answers without regenerating them.
    A missing image, a malformed row or a failed judge call is recorded and counted as unknown.

    \b
    Examples:
      ecso eval mmsb --data MM-SafetyBench/data --scenario ecso --out runs/mmsb
      ecso eval vlsafe --data VLSafe --images coco/train2017 --out runs/vlsafe --limit 200
      ecso eval vlsbench --data vlsbench --out runs/vls --judge guard --judge-model llama-guard-3-8b.gguf
      ecso eval vlsbench --data vlsbench --out runs/vls --leakage --judge llm --judge-model llava-1.5-7b
      ecso eval vlsbench --data vlsbench --out runs/vls --preset vlsbench --judge openai:https://api.openai.com/v1
      ecso eval mme --data MME_Benchmark_release_version --out runs/mme --preset ecso-paper
      ecso report runs/vls runs/mme --out runs/summary
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
