"""The ``diffprobe`` command. Each sub-command lives in ``diffprobe.commands.<name>`` and registers itself."""

from __future__ import annotations

import importlib

import typer

from .errors import exit_on_user_error

app = typer.Typer(
    name="diffprobe",
    help="Measure and steer text-to-image diffusion models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def options(
    verbose: bool = typer.Option(False, "--verbose", help="Also show what diffusers and transformers print "
                                 "(their logs, warnings and loading progress bars)."),
) -> None:
    """Measure and steer text-to-image diffusion models."""
    from .models.libraries import set_verbose

    set_verbose(verbose)


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
    exit_on_user_error(app)


if __name__ == "__main__":
    main()
