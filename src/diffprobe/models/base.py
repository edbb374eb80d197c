"""The model adapter interface: everything family-specific lives behind it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from ..guidance.base import AttentionLayer


@dataclass
class Conditioning:
    """Encoded text for a batch of branch texts (batch dim first in every tensor)."""

    tensors: dict[str, torch.Tensor]  # e.g. {"prompt_embeds": ..., "attention_mask": ...}
    truncated: list[bool] = field(default_factory=list)  # per text: longer than the encoder's limit
    tokens: list[list[str]] = field(default_factory=list)  # per text: token strings as the encoder saw them

    def rows(self, start: int, stop: int) -> Conditioning:
        """The conditioning of texts ``start:stop`` (for splitting one model call into several)."""
        return Conditioning(
            {k: v[start:stop] for k, v in self.tensors.items()}, self.truncated[start:stop], self.tokens[start:stop]
        )


class ModelAdapter(ABC):
    family: str
    model_id: str  # hub id or local path as given by the user
    device: torch.device
    dtype: torch.dtype
    scheduler: Any  # a diffusers scheduler
    vae_scale_factor: int  # pixels per latent cell
    latent_channels: int
    default_size: tuple[int, int]  # (height, width) in pixels
    token_limit: int

    @abstractmethod
    def encode(self, texts: list[str]) -> Conditioning: ...

    @abstractmethod
    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One batched denoiser call; returns the raw model output (eps or v), same shape as ``latents``."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> list[Image.Image]: ...

    @abstractmethod
    def attention_layers(self, height: int, width: int) -> list[AttentionLayer]:
        """Every attention module of the denoiser and its query grid for an image of height x width pixels."""

    @property
    @abstractmethod
    def denoiser(self) -> torch.nn.Module:
        """The module attention hooks are registered on (UNet or transformer)."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """Model id, revision or weights hash, family: part of every job key and provenance record."""
