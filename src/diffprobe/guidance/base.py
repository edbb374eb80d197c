"""The guider interface: pure arithmetic on per-branch model predictions.

The sampler asks a guider which prompts to encode (``branches``) and which attention maps it needs
(``attention_layers``), runs ONE batched model call over all branches, and hands the predictions to
``combine``. A guider never calls the model.

Batch layout used everywhere: branch-major. For B samples and K branches the model batch is
``[branch 0 of samples 0..B-1, branch 1 of samples 0..B-1, ...]``; ``combine`` receives the predictions
reshaped to ``(K, B, C, H, W)`` and captured attention maps as ``(K * B, queries, keys)`` in the same order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models.base import AttentionLayer  # re-exported: guiders and their users name layers with it


@dataclass(frozen=True)
class StepInfo:
    index: int  # 0-based step number
    num_steps: int
    timestep: float


@dataclass
class BatchContext:
    """What a guider may know about the batch it is guiding (set by the sampler before step 0)."""

    prompts: list[str]
    latent_size: tuple[int, int]  # (height, width) of the latent grid
    # Per branch text, the tokenizer's token strings (for token-aware guiders); may be empty.
    tokens: list[list[str]] = field(default_factory=list)


class Guider(ABC):
    """Base class for guiders. Subclasses set ``name`` and implement ``combine``."""

    name: str = "guider"

    def branches(self, prompt: str) -> list[str]:
        """Texts to encode for one prompt, in branch order. Default: unconditional then conditional."""
        return ["", prompt]

    def attention_layers(self, layers: Sequence[AttentionLayer], latent_size: tuple[int, int]) -> list[AttentionLayer]:
        """The attention layers whose maps ``combine`` needs. Default: none (fused attention everywhere)."""
        return []

    def start(self, context: BatchContext) -> None:
        """Called once per batch before the first step; reset per-batch state here."""
        self.context = context

    @abstractmethod
    def combine(self, preds: torch.Tensor, attention: dict[str, torch.Tensor], step: StepInfo) -> torch.Tensor:
        """Combine ``preds`` (K, B, C, H, W) into the guided prediction (B, C, H, W)."""

    def records(self) -> list[dict[str, Any]]:
        """Per-sample records for the finished batch (stored with each image). Default: nothing."""
        return [{} for _ in self.context.prompts]

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Name and every parameter that changes the output (part of the job key and provenance)."""
