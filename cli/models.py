"""`ecso models`: known models, where their files are, how to get the missing ones."""

from __future__ import annotations

import click

from ecso.cli.common import friendly_errors


@click.group("models", invoke_without_command=True)
@click.pass_context
@friendly_errors
def command(ctx) -> None:
    """List known models (demo, tiny, LLaVA recipes, your own) and whether they are on this machine."""
    if ctx.invoked_subcommand is None:
        from ecso.models.registry import list_models

        for e in list_models():
            state = "ready" if e.available else "missing"
            click.echo(f"{e.name:<16} {state:<8} {e.description}")
            if e.available:
                click.echo(f"{'':<25} model:  {e.model}")
                if e.mmproj:
                    click.echo(f"{'':<25} mmproj: {e.mmproj}")
            elif e.how_to_get:
                click.echo(f"{'':<25} get it: {e.how_to_get}")


@command.command("add")
@click.argument("name")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("mmproj", type=click.Path(exists=True, dir_okay=False), required=False)
@click.option("--chat-format", type=click.Choice(["auto", "llava-1.5", "gguf"]), default="auto")
@friendly_errors
def add(name, model, mmproj, chat_format) -> None:
    """Register a GGUF pair under NAME so `--model NAME` finds it."""
    from ecso.models.registry import add_model
    from ecso.runtime.gguf_info import read_gguf_info

    read_gguf_info(model, "model")
    if mmproj:
        read_gguf_info(mmproj, "mmproj")
    e = add_model(name, model, mmproj, chat_format)
    click.echo(f"registered {e.name}: {e.model} {e.mmproj or ''}")


@command.command("build-tiny")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Default: <cache>/tiny.")
@click.option("--tower", type=click.Choice(["clip", "siglip"]), default="clip", show_default=True)
@friendly_errors
def build_tiny(out, tower) -> None:
    """Build the tiny random LLaVA (HF folder) and export it with our exporter (needs `ecso[export]` extras
    for the tokenizer). Deterministic: the same bytes on every machine."""
    from pathlib import Path

    from ecso.export.llava_gguf import export_llava
    from ecso.models.tiny import TinyShape, build_tiny_llava, tiny_cache_dir

    root = Path(out) if out else tiny_cache_dir()
    hf = build_tiny_llava(root / "hf", TinyShape(tower=tower))
    r = export_llava(hf, root / "gguf", outtype="f32", overwrite=True)
    click.echo(f"tiny LLaVA ({tower}): {hf} -> {r.llm}, {r.mmproj}")


@command.command("demo-path")
@click.option("--image-size", type=int, default=224, show_default=True)
@friendly_errors
def demo_path(image_size) -> None:
    """Print the demo model's GGUF and (generated) projector paths."""
    from ecso.models.demo import demo_llm_path, demo_mmproj_path
    from ecso.models.registry import cache_root

    click.echo(demo_llm_path())
    click.echo(demo_mmproj_path(cache_root(), image_size))
