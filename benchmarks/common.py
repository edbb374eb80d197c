"""What the benchmark scripts share: the models they time and GPU-aware clocks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffprobe.models import SDAdapter, choose_device, choose_dtype, load_model
from diffprobe.models.tiny import build_tiny_sd, sd15_random_pipeline

MODEL_HELP = "tiny, sd15-random, shapes, or a checkpoint folder / hub id"


def load_benchmark_model(model: str, tmp: Path, device: str, dtype: str, light_vae: bool = False) -> Any:
    """``tiny`` (built in ``tmp``), ``sd15-random`` (SD 1.5 architecture, random weights, in memory) or any model
    ``load_model`` knows. ``light_vae`` gives sd15-random a few-channel VAE, for timing the denoising loop alone."""
    if model == "sd15-random":
        dev = choose_device(device)
        pipe = sd15_random_pipeline(tmp, dev, choose_dtype(dev, dtype), light_vae=light_vae)
        return SDAdapter(pipe, "sd15-random", "sd", {})
    if model == "tiny":
        model = str(build_tiny_sd(tmp / "tiny"))
    return load_model(model, device=device, dtype=dtype)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
