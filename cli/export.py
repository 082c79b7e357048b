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
    """Export a Hugging Face LLaVA-1.5 (LlavaForConditionalGeneration) or LLaVA-1.6 (LlavaNextForConditionalGeneration)
    folder (safetensors) to a GGUF pair that stock llama.cpp loads: the LLM with its tokenizer and chat template, and
    the mmproj (vision tower + projector; LLaVA-1.6's tile resolutions).

    Reads weights lazily (bf16/f16/f32), needs no torch, and checks the files by reading them back. Nothing is
    left in --out if anything fails.
    """
    from ecso.export.llava_gguf import export_llava

    r = export_llava(hf_dir, out_dir, outtype=outtype, overwrite=force)
    click.echo(f"wrote {r.llm} and {r.mmproj} ({r.outtype}) in {r.seconds:.2f}s")
    click.echo(f"run it: ecso-run --model {r.llm} --mmproj {r.mmproj} --image IMAGE \"QUERY\"")


@command.command("hf")
@click.argument("hf_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder: llm.gguf and mmproj.gguf.")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default="f16", show_default=True,
              help="Weight type (the converter keeps the tensors that need it in f32).")
@click.option("--force", is_flag=True, help="Replace existing files in --out.")
@friendly_errors
def hf(hf_dir, out_dir, outtype, force) -> None:
    """Convert a Hugging Face VLM folder (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 3, SmolVLM / Idefics3, Mistral 3 /
    Pixtral, LFM2-VL, GLM-4.1V, ...) to a GGUF pair with llama.cpp's own convert_hf_to_gguf.py, of exactly the
    llama.cpp this runtime is built on (docs/families.md says what is proven per family). Mistral 3: the converter
    runs through a shim that keeps the [IMG_BREAK] embedding the plain script drops.

    The converter comes from the llama-cpp-python 0.3.36 sdist (fetched by pip once per machine, sha256-checked,
    cached); it needs torch and transformers (pip install 'ecso[export]'). LLaVA-1.5 checkpoints: `ecso export llava`.
    """
    from pathlib import Path

    from ecso.export.llamacpp_convert import ConverterError, convert, converter_dir

    out = Path(out_dir)
    llm, mmproj = out / "llm.gguf", out / "mmproj.gguf"
    if not force and (llm.exists() or mmproj.exists()):
        raise click.ClickException(f"{out} already holds a conversion; pass --force to replace it")
    try:
        conv = converter_dir()
        convert(Path(hf_dir), llm, outtype=outtype, converter=conv)
        convert(Path(hf_dir), mmproj, outtype=outtype, mmproj=True, converter=conv)
    except ConverterError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {llm} and {mmproj} ({outtype}) with llama.cpp's converter ({conv.root})")
    click.echo(f"run it: ecso-run --model {llm} --mmproj {mmproj} --image IMAGE \"QUERY\"")
