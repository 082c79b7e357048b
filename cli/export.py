"""`ecso export llava HF_DIR --out DIR`: Hugging Face LLaVA -> GGUF pair (+ ecso.json)."""

from __future__ import annotations

import click

from ecso.cli.common import friendly_errors


@click.group("export")
def command() -> None:
    """Convert models for the runtime (GGUF for llama.cpp; ONNX heads via `ecso heads`)."""


@command.command("llava")
@click.argument("hf_dir", type=click.Path())
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder: llm.gguf, mmproj.gguf, ecso.json.")
@click.option("--outtype", type=click.Choice(["f32", "f16", "q8_0"]), default="f16", show_default=True,
              help="Weight type of the LLM (the vision tower stays f16 at q8_0). f32 for exact parity checks.")
@click.option("--force", is_flag=True, help="Replace an existing export in --out.")
@friendly_errors
def llava(hf_dir, out_dir, outtype, force) -> None:
    """Export a Hugging Face LlavaForConditionalGeneration folder (safetensors) to a GGUF pair that stock
    llama.cpp loads: the LLM with its tokenizer and chat template, and the mmproj (vision tower + projector).

    Reads weights lazily (bf16/f16/f32), needs no torch, and checks the files by reading them back. Nothing is
    left in --out if anything fails.
    """
    from ecso.export.llava_gguf import export_llava

    r = export_llava(hf_dir, out_dir, outtype=outtype, overwrite=force)
    click.echo(f"wrote {r.llm} and {r.mmproj} ({r.outtype}) in {r.seconds:.2f}s")
    click.echo(f"run it: ecso-run --model {r.llm} --mmproj {r.mmproj} --image IMAGE \"QUERY\"")
