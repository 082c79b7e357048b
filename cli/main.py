"""The `ecso` command group. Each subcommand lives in its own module as a click command named `command`."""

from __future__ import annotations

import importlib

import click

# module -> command name; a module registers one click command (or group) called `command`
SUBCOMMANDS = ("run", "export", "models", "bench", "eval", "report", "data_engine", "serve", "heads", "doctor")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ecso")
def cli() -> None:
    """ecso: ECSO (Eyes Closed, Safety On) for multimodal LLMs on llama.cpp, on your own machine.

    Start with `ecso run --image examples/street.png "What is happening here?"` (or `ecso-run`).
    """


def _register() -> None:
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"ecso.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"ecso.cli.{name}":
                continue  # that command is not part of this build
            raise
        cli.add_command(module.command)


_register()


def main() -> None:
    from ecso.runtime.llama_settings import prefer_short_openmp_spin

    prefer_short_openmp_spin()
    cli(prog_name="ecso")


if __name__ == "__main__":
    main()
