"""`ecso report RUN_DIR...`: the papers' tables (Markdown + JSON + PNG) from run folders, and with several run
folders a summary of safety and utility side by side."""

from __future__ import annotations

import json

import click

from ecso.cli.common import friendly_errors


@click.command("report", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--judge", default=None, help="Which judge's verdicts to report (default: the last one used; one run "
                                            "folder only). The JSON lists every judge that has read the run.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Where to write report.md/.json/.png (default: the run folder); with several run folders, where "
                   "summary.md/.json/.png go (required).")
@click.option("--no-plot", is_flag=True, help="Skip the PNG.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON instead of the Markdown.")
@friendly_errors
def command(run_dirs, judge, out_dir, no_plot, as_json):
    """Tables like the papers', with and without ECSO side by side, from RUN_DIR (written by `ecso eval`).

    \b
    MM-SafetyBench  harmless and attack rate per scenario and image mode
    VLSafe          harmless rate
    VLSBench        safe rate with its refusal / warning / unsafe split per category
    MME             scores per subtask, perception / cognition totals, ECSO's flag rate on benign questions
    benign          over-refusal and ECSO's flag rate
    --leakage runs  text-alone harm rate, pair harm rate (R1), leak share (R2/R1), with counts and definitions
    Every number is per defense over the row's samples (a run holds one record per sample and defense); unknowns
    (missing images, failed or unparsable judge replies, unjudged answers) stay in the denominator. Each header says
    when its judge is not the paper's. Several RUN_DIRs: also a summary (--out DIR) of safety and utility side by side.
    """
    from ecso.eval.report import write_report, write_summary

    if len(run_dirs) == 1:
        report = write_report(run_dirs[0], judge, out_dir, plot=not no_plot)
    else:
        if not out_dir:
            raise click.UsageError("several run folders: give --out DIR for the summary")
        if judge:
            raise click.UsageError("--judge applies to one run folder")
        report = write_summary(list(run_dirs), out_dir, plot=not no_plot)
    click.echo(json.dumps(report.data, indent=2, ensure_ascii=False) if as_json else report.markdown)
    click.echo(f"[report] {', '.join(report.files.values())}", err=True)
