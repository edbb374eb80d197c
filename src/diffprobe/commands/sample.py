"""``diffprobe sample diadm MODEL --out RUN``: sample a model made by ``diffprobe train diadm`` into a run
directory (one image per training feature, seed = index), which every ``diffprobe score`` reads."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..console import message, resumable

sample_app = typer.Typer(help="Sample models trained by `diffprobe train` into run directories.",
                         no_args_is_help=True)


@sample_app.command("diadm")
def diadm_cmd(
    model: Path = typer.Argument(..., help="Model folder written by `diffprobe train diadm`."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory (created, or continued: stored images are "
                             "skipped)."),
    features_from: Path | None = typer.Option(None, "--features-from", help="pseudocond: condition on the features "
                                              "of these images (a folder, embedded with the model's embedder) or "
                                              "of a .npy array [n, dim], instead of the training features."),
    steps: int = typer.Option(50, "--steps", help="DDIM steps (eta 0)."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Images per denoiser call."),
    limit: int | None = typer.Option(None, "--limit", help="Only the first N conditions (a larger N later adds "
                                     "the rest to the run)."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda (default: the best available)."),
    new: bool = typer.Option(False, "--new", help="Move an existing run at --out aside and start afresh."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Feature cache (default: $DIFFPROBE_CACHE)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the feature cache."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """One image per condition: training features (pseudocond), training classes (class), or as many
    unconditional images as training images (uncond)."""
    from ..diadm import sample_diadm

    console = Console(stderr=True)
    columns = (TextColumn("sampling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with (resumable(console, f"finished images are kept in {out}"),
          Progress(*columns, console=console, transient=True, disable=quiet) as bar):
        task = bar.add_task("sample", total=None)
        result = sample_diadm(model, out, features_from=features_from, steps=steps, batch_size=batch_size,
                              limit=limit, device=device, new=new, cache_dir=cache_dir, no_cache=no_cache,
                              progress=lambda n: bar.advance(task, n))
    per = f" ({result.seconds / result.generated:.3f} s per image)" if result.generated else ""
    console.print(message(f"{result.generated} sampled, {result.skipped} already in the run{per}; wrote "
                          f"{result.run_dir}"))
    typer.echo(str(result.run_dir))


def register(app: typer.Typer) -> None:
    app.add_typer(sample_app, name="sample")
