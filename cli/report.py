"""`ecso report RUN_DIR`: the papers' tables (Markdown + JSON + PNG) from a run folder."""

from __future__ import annotations

import json

import click

from ecso.cli.common import friendly_errors


@click.command("report", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--judge", default=None, help="Which judge's verdicts to report (default: the last one used). "
                                            "The JSON lists every judge that has read the run.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Where to write report.md/.json/.png (default: the run folder).")
@click.option("--no-plot", is_flag=True, help="Skip the PNG.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON instead of the Markdown.")
@friendly_errors
def command(run_dir, judge, out_dir, no_plot, as_json):
    """Tables like the papers', with and without ECSO side by side, from RUN_DIR (written by `ecso eval`).

    \b
    MM-SafetyBench  harmless and attack rate per scenario and image mode
    VLSafe          harmless rate
    VLSBench        safe rate with its refusal / warning / unsafe split per category
    Every row carries its coverage (n_total, n_judged, n_unknown): missing images, failed or unparsable judge
    replies and unjudged answers stay in the denominator. Works on a run that is still going.
    """
    from ecso.eval.report import write_report

    report = write_report(run_dir, judge, out_dir, plot=not no_plot)
    click.echo(json.dumps(report.data, indent=2, ensure_ascii=False) if as_json else report.markdown)
    click.echo(f"[report] {', '.join(report.files.values())}", err=True)
