"""The model adapter interface: everything family-specific lives behind it.

The sampler (:mod:`diffprobe.sampling`) and the generation driver (:mod:`diffprobe.generate`) know a model only
through :class:`ModelAdapter`. This module imports nothing else of diffprobe, so guidance and sampling can depend
on it without models depending on them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import torch
from PIL import Image

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

DEFAULT_STEPS = 50  # denoising steps when neither the user nor the checkpoint names a count


@dataclass(frozen=True)
class AttentionLayer:
    """One attention module of the denoiser and the spatial grid of its queries."""

    name: str  # module path inside the denoiser, e.g. "down_blocks.2.attentions.0.transformer_blocks.0.attn2"
    kind: Literal["self", "cross"]
    height: int
    width: int


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

    def take(self, index: list[int]) -> Conditioning:
        """The conditioning of texts ``index`` in that order (repeats allowed)."""
        return Conditioning(
            {k: v[index] for k, v in self.tensors.items()},
            [self.truncated[i] for i in index],
            [self.tokens[i] for i in index],
        )


class Recommended(TypedDict, total=False):
    """Sampling settings a checkpoint's makers recommend (its ``diffprobe.json``); either may be absent."""

    steps: int
    guidance_scale: float


class ModelAdapter(ABC):
    """One loaded checkpoint of one family, as the sampler and the driver see it."""

    family: str  # "sd", "sdxl", "pixart"
    model_id: str  # hub id, absolute local path, or a registered built-in name ("shapes")
    device: torch.device
    dtype: torch.dtype
    scheduler: SchedulerMixin  # the configured scheduler; sampling uses copies from fresh_scheduler()
    scheduler_name: str  # "default" (the checkpoint's) or a name from diffprobe.models.loading.SCHEDULERS
    vae_scale_factor: int  # pixels per latent cell
    latent_channels: int
    default_size: tuple[int, int]  # (height, width) in pixels
    token_limit: int  # tokens the text encoder sees; longer prompts are truncated
    recommended: Recommended  # the checkpoint's recommended settings ({} when it names none)

    @abstractmethod
    def encode(self, texts: list[str]) -> Conditioning: ...

    @abstractmethod
    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                denoiser: torch.nn.Module | None = None) -> torch.Tensor:
        """One batched denoiser call; returns the raw model output (eps or v), same shape as ``latents``.

        ``t``: one timestep, or one per latent. ``denoiser`` replaces :attr:`denoiser` for this call (training
        calls it wrapped for several GPUs)."""

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

    @abstractmethod
    def check_size(self, height: int, width: int) -> None:
        """Raise :class:`~diffprobe.errors.ResolutionError` unless the model can sample height x width pixels."""

    @abstractmethod
    def fresh_scheduler(self) -> SchedulerMixin:
        """A new scheduler with the adapter's config: schedulers are stateful, so each batch gets its own."""

    @property
    def default_steps(self) -> int:
        """Denoising steps when the user names none: the checkpoint's recommendation, else 50."""
        return int(self.recommended.get("steps", DEFAULT_STEPS))

    def guidance_defaults(self) -> dict[str, Any]:
        """Guider parameters the checkpoint recommends, for parameters the user leaves unset.

        The CLI and the Python API resolve defaults the same way::

            guider = make_guider("cfg", **adapter.guidance_defaults())                # shapes: scale 3.5
            guider = make_guider("scfg", **{**adapter.guidance_defaults(), "rescale": 0.7})
            sample(adapter, guider, prompts, seeds)                                   # steps: default_steps

        An empty dict when the checkpoint recommends nothing (each guider's own defaults then apply).
        """
        scale = self.recommended.get("guidance_scale")
        return {} if scale is None else {"scale": float(scale)}
