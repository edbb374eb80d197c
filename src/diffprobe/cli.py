"""The ``diffprobe`` command. Each sub-command lives in ``diffprobe.commands.<name>`` and registers itself."""

from __future__ import annotations

import functools

import typer
from typer.core import TyperGroup

from .commands import audit, compare, doctor, export, generate, judge, report, sample, score, seeds, train
from .errors import InputError, exit_on_user_error


class DiffprobeGroup(TyperGroup):
    """The top-level command: a user error prints one line and exits 2 wherever the app runs (console script,
    ``python -m``, typer's CliRunner), and every argument must be text."""

    def main(self, *args, **kwargs):
        exit_on_user_error(functools.partial(super().main, *args, **kwargs))

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        for arg in args:
            try:
                arg.encode("utf-8")
            except UnicodeEncodeError:  # surrogate escapes: bytes that were not UTF-8 on the command line
                raise InputError(f"argument {ascii(arg)} is not valid UTF-8 text; retype it, or rename the file "
                                 "it names") from None
        return super().parse_args(ctx, args)


app = typer.Typer(
    name="diffprobe",
    help="Measure and steer text-to-image diffusion models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=DiffprobeGroup,
)



@app.callback()
def options(
    verbose: bool = typer.Option(False, "--verbose", help="Also show what diffusers and transformers print "
                                 "(their logs, warnings and loading progress bars)."),
) -> None:
    """Measure and steer text-to-image diffusion models."""
    from .models.libraries import set_verbose

    set_verbose(verbose)


# Every command, explicitly: a new command module defines ``register(app)`` and is added here.
COMMANDS = (generate, judge, export, doctor, score, compare, seeds, audit, report, train, sample)
for _command in COMMANDS:
    _command.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
