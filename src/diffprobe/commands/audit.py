"""``diffprobe audit CONFIG.yaml``: generate, score, judge and compare every arm of an audit, then report."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from ..console import message, resumable
from . import backend_options as bo


def register(app: typer.Typer) -> None:
    @app.command("audit")
    def audit_cmd(
        config: Path = typer.Argument(..., help="Audit config (YAML): models (LoRA optional), prompts, seed sets "
                                      "(grids or reliable:FILE[:K]), guidance arms (lists expand to one arm per "
                                      "value), baseline, measures; see docs/audit.md."),
        out: Path | None = typer.Option(None, "--out", "-o", help="Audit directory (default: audits/<name>)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the arms, the images to make and already "
                                     "made, and an estimate timed on one batch; make nothing."),
        no_timing: bool = typer.Option(False, "--no-timing", help="With --dry-run: skip the timed batch (no model "
                                       "is loaded)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress view (a line per step instead)."),
        backend: str = bo.BACKEND,
        address: str | None = bo.ADDRESS,
        workers: int | None = bo.WORKERS,
        gpus_per_worker: float | None = bo.GPUS_PER_WORKER,
    ) -> None:
        """Run an audit (resumable: a re-run makes only what is missing) and write summary.json and the report."""
        from ..audit import default_dir, load_config, run_audit
        from ..audit import dry_run as plan
        from ..errors import check_writable

        console = Console(stderr=True)
        audit_dir = out if out is not None else default_dir(load_config(config)[0], config)
        runner = bo.backend_from_flags(backend, address, workers, gpus_per_worker)
        if dry_run:
            for line in plan(config, audit_dir, console=console, timing=not no_timing):
                typer.echo(line)
            return
        check_writable(audit_dir, directory=True)
        with resumable(console, f"finished images and verdicts are kept in {audit_dir}"):
            result = run_audit(config, audit_dir, console=console, progress=not quiet, backend=runner)
        for note in result.notes:
            console.print(message(note, "note:"))
        bo.print_pool_summaries(console, result.workers)
        console.print(message(f"summary: {audit_dir / 'summary.json'}"))
        typer.echo(str(result.index))
