"""``diffprobe train diadm --images DIR --cond pseudocond|uncond|class --out MODEL``: train a small image diffusion
model conditioned on each training image's feature (DiADM), its class, or nothing; resumes after a kill."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from ..console import message, resumable

train_app = typer.Typer(help="Train models: DiADM (pseudo-label conditioning) and its comparison models.",
                        no_args_is_help=True)


@train_app.command("diadm")
def diadm_cmd(
    images: str = typer.Option(..., "--images", help="Training images: a folder (recursive; one subfolder per class "
                               "for --cond class), or fashion-mnist[:train|test][:N] (a seeded subset, written "
                               "once to the cache folder)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (a new one): the model. Checkpoints go to "
                             "OUT.training until it is done."),
    cond: str = typer.Option("pseudocond", "--cond", help="pseudocond (each image's L2-normalised feature, DiADM), "
                             "uncond (no condition) or class (the image's class)."),
    embedder: str = typer.Option("efficientnet-lite0@64", "--embedder", help="Feature extractor of the pseudo-"
                                 "labels (pseudocond): efficientnet-lite0[@SIZE], clip-vit-b32, swav/inception "
                                 "need weights, pixels, random-projection."),
    resolution: int = typer.Option(32, "--resolution", help="Training and sampling size in pixels."),
    channels: int = typer.Option(3, "--channels", help="1 (grayscale) or 3 (RGB)."),
    width: int = typer.Option(32, "--width", help="UNet channels of the first level (then 2x, 2x)."),
    steps: int = typer.Option(2000, "--steps", help="Optimisation steps."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Images per step (the budget is steps x batch)."),
    lr: float = typer.Option(2e-4, "--lr", help="Learning rate (AdamW; constant after --warmup)."),
    warmup: int = typer.Option(100, "--warmup", help="Linear learning-rate warm-up steps."),
    ema_decay: float = typer.Option(0.999, "--ema-decay", help="EMA decay; the saved weights are the EMA."),
    no_ema: bool = typer.Option(False, "--no-ema", help="Save the raw weights (no EMA)."),
    checkpoint_every: int = typer.Option(500, "--checkpoint-every", help="Steps between checkpoints (0: none)."),
    keep_checkpoints: bool = typer.Option(False, "--keep-checkpoints", help="Keep OUT.training after the run."),
    log_every: int = typer.Option(20, "--log-every", help="Steps per loss.csv row."),
    seed: int = typer.Option(0, "--seed", help="Initial weights, data order, noise and timesteps."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda (default: the best available)."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Feature cache and data set folder (default: "
                                          "$DIFFPROBE_CACHE, else ~/.cache/diffprobe)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the feature cache."),
) -> None:
    """Train DiADM (pseudocond) or a comparison model (uncond, class) with the same UNet, budget and seed."""
    from ..diadm import DiadmOptions, train_diadm, work_folder

    console = Console(stderr=True)
    options = DiadmOptions(cond=cond, embedder=embedder, resolution=resolution, channels=channels, width=width,
                           steps=steps, batch=batch_size, lr=lr, warmup=warmup,
                           ema_decay=None if no_ema else ema_decay, checkpoint_every=checkpoint_every,
                           log_every=log_every, seed=seed)
    with resumable(console, f"checkpoints are kept in {work_folder(out)}",
                   "run the same command to resume from the newest one"):
        result = train_diadm(images, out, options, device=device, cache_dir=cache_dir, no_cache=no_cache,
                             keep_work=keep_checkpoints)
    resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from else ""
    console.print(message(f"trained a {cond} model ({result.parameters:,} parameters) for {result.steps} steps"
                          f"{resumed} in {result.seconds:.0f} s; wrote {result.out}"))
    typer.echo(str(result.out))


def register(app: typer.Typer) -> None:
    app.add_typer(train_app, name="train")
