"""``diffprobe seeds ...``: reliable seeds (mining, sampling data, fine-tuning)."""

from __future__ import annotations

import typer

from . import finetune

seeds_app = typer.Typer(help="Reliable seeds: mine seeds with a judge, build data with them, fine-tune Q/K.",
                        no_args_is_help=True)
finetune.register(seeds_app)


def register(app: typer.Typer) -> None:
    app.add_typer(seeds_app, name="seeds")
