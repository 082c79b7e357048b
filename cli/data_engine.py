"""`ecso data-engine`: SFT records (LLaVA conversation format) from ECSO's safe answers to the samples it flags."""

from __future__ import annotations

from pathlib import Path

import click

from ecso.cli.common import friendly_errors, model_options
from ecso.cli.eval_options import build_config, echo_summary, generation_options, selection_options


@click.command("data-engine", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bench", required=False)
@selection_options
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The SFT JSONL to write.")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Where ECSO's answers are kept (resumable; default: OUT.run/).")
@click.option("--from-run", type=click.Path(exists=True, file_okay=False), default=None,
              help="Use the ECSO answers of an existing `ecso eval` run folder instead of generating.")
@click.option("--image-root", type=click.Path(file_okay=False), default=None,
              help="Write image paths relative to this folder (LLaVA's --image_folder); default absolute.")
@click.option("--only-judged-safe", is_flag=True,
              help="Keep only safe answers that the judge (--judge) also calls safe.")
@model_options
@generation_options
@friendly_errors
def command(bench, out, run_dir, from_run, image_root, only_judged_safe, **kw):
    """Turn ECSO into a data engine: run it on BENCH (or reuse a run with --from-run) and write, for every sample
    ECSO flags unsafe, an SFT record {image, conversations: [<image>\\nquery, ECSO's safe answer]} with the full
    ECSO trace for audit.

    \b
    Examples:
      ecso data-engine vlsbench --data vlsbench --out sft.jsonl --model llm.gguf --mmproj mmproj.gguf
      ecso data-engine custom --data my_queries.jsonl --out sft.jsonl --image-root images/
      ecso data-engine --from-run runs/mmsb --out sft.jsonl
    """
    from ecso.eval.benchmarks import canonical_benchmark
    from ecso.eval.data_engine import export_sft
    from ecso.eval.runner import run_eval

    if from_run:
        if bench or kw.get("data"):
            raise click.UsageError("give either BENCH --data DIR or --from-run RUN_DIR, not both")
        source = Path(from_run)
    else:
        if not bench:
            raise click.UsageError("give BENCH and --data DIR (or --from-run RUN_DIR)")
        source = Path(run_dir) if run_dir else Path(out + ".run")
        if not kw.get("judge") and not kw.get("judge_model"):
            kw["judge"] = "rule" if only_judged_safe else "none"
        cfg = build_config(canonical_benchmark(bench), kw.pop("data"), str(source), ("ecso",), False, kw)
        echo_summary(run_eval(cfg))
    s = export_sft(source, out, image_root, only_judged_safe)
    click.echo(f"[data-engine] {s.n_written} SFT records -> {s.out} (ECSO answers: {s.n_generated} of "
               f"{s.n_samples} samples, flagged unsafe: {s.n_flagged}, skipped: {s.n_skipped_empty} empty, "
               f"{s.n_skipped_judge} not judged safe)", err=True)
