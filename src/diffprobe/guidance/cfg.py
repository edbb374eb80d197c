"""Classifier-free guidance, the guider every other one is compared with."""

from __future__ import annotations

from typing import Any

import torch

from .base import Guider, StepInfo


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, Sec. 3.4): match the per-sample std of the conditional prediction."""
    dims = list(range(1, guided.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)
    return rescale * rescaled + (1 - rescale) * guided


class CFG(Guider):
    name = "cfg"

    def __init__(self, scale: float = 7.5, rescale: float = 0.0):
        self.scale = float(scale)
        self.rescale = float(rescale)

    def combine(self, preds: torch.Tensor, attention: dict[str, torch.Tensor], step: StepInfo) -> torch.Tensor:
        uncond, cond = preds[0], preds[1]
        guided = uncond + self.scale * (cond - uncond)
        if self.rescale > 0:
            guided = rescale_guidance(guided, cond, self.rescale)
        return guided

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "scale": self.scale, "rescale": self.rescale}
