"""``diffprobe export``: the samples table of a run as JSONL (nested) or Parquet (flattened columns)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import InputError, writing

FORMATS = ("jsonl", "parquet")


def export_run(run_dir: Path, fmt: str | None = None, out: Path | None = None) -> tuple[Path, int]:
    """Write the export file (format from ``fmt`` or ``out``'s suffix, default jsonl); returns (path, rows)."""
    from ..store import open_run

    if fmt is None:
        fmt = out.suffix.lstrip(".").lower() if out is not None and out.suffix else "jsonl"
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    out = out or Path(run_dir) / f"samples.{fmt}"
    with open_run(run_dir) as store, writing(out):
        rows = store.export_jsonl(out) if fmt == "jsonl" else store.export_parquet(out)
    return out, rows


def register(app: typer.Typer) -> None:
    if any(cmd.name == "export" for cmd in app.registered_commands):
        return  # already registered by another module

    @app.command("export")
    def export_cmd(
        run_dir: Path = typer.Argument(..., help="A run directory made by 'diffprobe generate'."),
        fmt: str | None = typer.Option(None, "--format", "-f", help="jsonl (nested) or parquet (flat columns); "
                                       "default: from --out's suffix, else jsonl."),
        out: Path | None = typer.Option(None, "--out", "-o", help="Output file (default: RUN_DIR/samples.<format>)."),
    ) -> None:
        """Export a run's samples with their provenance."""
        path, rows = export_run(run_dir, fmt, out)
        typer.echo(f"{rows} samples -> {path}")
