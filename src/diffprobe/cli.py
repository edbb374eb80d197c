"""The ``diffprobe`` command. Each sub-command lives in ``diffprobe.commands.<name>`` and registers itself."""

from __future__ import annotations

import importlib
import sys

import typer
from rich.console import Console

from .errors import DiffprobeError

app = typer.Typer(
    name="diffprobe",
    help="Measure and steer text-to-image diffusion models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Modules under diffprobe.commands that define ``register(app)``; missing ones are skipped.
COMMAND_MODULES = ["generate", "export", "doctor", "score", "compare", "seeds", "report", "audit"]

for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"diffprobe.commands.{_name}")
    except ModuleNotFoundError as _err:
        if _err.name != f"diffprobe.commands.{_name}":
            raise
        continue
    _module.register(app)


def main() -> None:
    try:
        app()
    except DiffprobeError as err:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {err}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
