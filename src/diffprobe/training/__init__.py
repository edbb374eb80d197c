"""The one training core (accelerate: devices, precision, checkpoints, resume, EMA, loss log).

The shapes-world trainer, Q/K fine-tuning (``diffprobe seeds finetune``) and any other recipe give it trainable
parameters and a loss over a batch; see :mod:`diffprobe.training.core`.
"""

from .core import (
    FitResult,
    StepContext,
    Trainer,
    TrainSettings,
    checkpoints,
    latest_checkpoint,
)
from .log import LossLog, read_loss_csv

__all__ = [
    "FitResult",
    "LossLog",
    "StepContext",
    "TrainSettings",
    "Trainer",
    "checkpoints",
    "latest_checkpoint",
    "read_loss_csv",
]
