"""``diffprobe report RUN_OR_AUDIT_DIR``: a static HTML report (index.html, thumbnails, plots)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from ..console import message


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report_cmd(
        path: Path = typer.Argument(..., help="Run directory (diffprobe generate) or audit directory (diffprobe "
                                    "audit)."),
        out: Path | None = typer.Option(None, "--out", "-o", help="Report folder (default: PATH/report)."),
        max_prompts: int = typer.Option(12, "--max-prompts", help="Prompts shown in the seed grids (evenly "
                                        "spaced; the page says how many of how many)."),
        max_seeds: int = typer.Option(8, "--max-seeds", help="Seeds shown per prompt in the seed grids."),
    ) -> None:
        """Write a self-contained HTML report that opens from file:// (no server, no network)."""
        from ..report import build_report

        index = build_report(path, out, max_prompts=max_prompts, max_seeds=max_seeds)
        Console(stderr=True).print(message(f"report written; open {index}"))
        typer.echo(str(index))
