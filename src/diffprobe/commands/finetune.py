"""``diffprobe seeds finetune DATA --model M --out DIR``: Q/K-only (or other projections, LoRA, full) fine-tuning
of the denoiser on an image folder; resumes after a kill."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from ..console import message, resumable


def register(seeds_app: typer.Typer) -> None:
    @seeds_app.command("finetune")
    def finetune_cmd(
        data: Path = typer.Argument(..., help="Folder of images with metadata.jsonl ({\"file_name\", \"text\"} per "
                                    "line; what `seeds dataset` writes)."),
        model: str = typer.Option(..., "--model", "-m", help="Hub id, local diffusers folder, or 'shapes'."),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder (a new one): the fine-tuned model, or "
                                 "the LoRA adapter with --lora. Checkpoints go to OUT.training until it is done."),
        layers: str | None = typer.Option(None, "--layers", help="Blocks to train: d1d2mu1u2 (default for UNets), "
                                          "down_blocks.1,mid_block,..., PixArt block numbers 0,1,..., or all."),
        attention: str = typer.Option("attn1,attn2", "--attention", help="attn1 (self), attn2 (cross) or both."),
        modules: str = typer.Option("q,k", "--modules", help="Projections to train: any of q,k,v,o."),
        full: bool = typer.Option(False, "--full", help="Train every denoiser parameter instead."),
        lora: int | None = typer.Option(None, "--lora", help="Train LoRA adapters of this rank on the selected "
                                        "projections instead (sd, sdxl)."),
        lora_alpha: float | None = typer.Option(None, "--lora-alpha", help="LoRA alpha (default: the rank)."),
        resolution: int | None = typer.Option(None, "--resolution", help="Training size (default: the model's)."),
        batch_size: int = typer.Option(16, "--batch-size", "-b", help="Images per micro-batch and process."),
        grad_accum: int = typer.Option(8, "--grad-accum", help="Micro-batches per optimisation step."),
        steps: int = typer.Option(5000, "--steps", help="Optimisation steps."),
        lr: float = typer.Option(1.28e-4, "--lr", help="Learning rate (constant after --warmup)."),
        warmup: int = typer.Option(0, "--warmup", help="Linear learning-rate warm-up steps."),
        ema_decay: float = typer.Option(0.9999, "--ema-decay", help="EMA decay; the saved weights are the EMA."),
        no_ema: bool = typer.Option(False, "--no-ema", help="Save the raw weights (no EMA)."),
        mixed_precision: str = typer.Option("auto", "--mixed-precision", help="auto (bf16 on GPU, none on CPU), "
                                            "no, fp16, bf16."),
        gradient_checkpointing: bool | None = typer.Option(
            None, "--gradient-checkpointing/--no-gradient-checkpointing", help="Default: on for GPUs."),
        checkpoint_every: int = typer.Option(1000, "--checkpoint-every", help="Steps between checkpoints (0: none)."),
        keep_checkpoints: bool = typer.Option(False, "--keep-checkpoints", help="Keep OUT.training (checkpoints, "
                                              "raw weights) after a finished run."),
        log_every: int = typer.Option(10, "--log-every", help="Steps per loss.csv row."),
        seed: int = typer.Option(0, "--seed", help="Data order, flips, noise and timesteps."),
        no_center_crop: bool = typer.Option(False, "--no-center-crop", help="Crop the top-left square instead."),
        no_random_flip: bool = typer.Option(False, "--no-random-flip", help="Do not mirror images at random."),
        workers: int = typer.Option(0, "--workers", help="Processes that decode images ahead of the GPU."),
        device: str | None = typer.Option(None, "--device", help="cpu, cuda (default: the best available; several "
                                          "GPUs: `accelerate launch -m diffprobe.cli seeds finetune ...`)."),
    ) -> None:
        """Fine-tune the denoiser's attention Q/K projections (the reliable-seeds recipe) on an image folder."""
        from ..finetune import FinetuneOptions, finetune, work_folder

        console = Console(stderr=True)
        options = FinetuneOptions(
            layers=layers, attentions=attention, projections=modules, full=full, lora_rank=lora,
            lora_alpha=lora_alpha, resolution=resolution, batch=batch_size, steps=steps, lr=lr,
            accumulation=grad_accum, warmup=warmup, ema_decay=None if no_ema else ema_decay,
            mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing,
            checkpoint_every=checkpoint_every, log_every=log_every, seed=seed, center_crop=not no_center_crop,
            random_flip=not no_random_flip, workers=workers)
        with resumable(console, f"checkpoints are kept in {work_folder(out)}",
                       "run the same command to resume from the newest one"):
            result = finetune(data, model, out, options, device=device, keep_work=keep_checkpoints)
        resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from else ""
        console.print(message(f"trained {result.trainable_parameters:,} of {result.total_parameters:,} denoiser "
                              f"parameters for {result.steps} steps{resumed}; wrote {result.out}"))
        typer.echo(str(result.out))
