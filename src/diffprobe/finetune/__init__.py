"""Fine-tuning a model's denoiser on an image folder: Q/K-only (the reliable-seeds paper), other attention
projections, LoRA adapters, or the whole denoiser. The command is ``diffprobe seeds finetune``."""

from .data import Example, read_image_folder
from .layers import Selection, attention_blocks, select
from .run import FinetuneOptions, FinetuneResult, diffusion_loss, finetune, noise_scheduler_of, work_folder

__all__ = [
    "Example",
    "FinetuneOptions",
    "FinetuneResult",
    "Selection",
    "attention_blocks",
    "diffusion_loss",
    "finetune",
    "noise_scheduler_of",
    "read_image_folder",
    "select",
    "work_folder",
]
