"""Classifier-free guidance, the guider every other one is compared with."""

from __future__ import annotations

import torch

from .base import FiniteFloat, Guider, GuiderParams, StepInfo


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, Sec. 3.4): match the per-sample std of the conditional prediction."""
    dims = list(range(1, guided.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)
    return rescale * rescaled + (1 - rescale) * guided


class CFGParams(GuiderParams):
    scale: FiniteFloat = 7.5
    rescale: FiniteFloat = 0.0  # guidance rescale phi (0: off)


class CFG(Guider):
    """``CFG(scale=7.5, rescale=0.0)``."""

    name = "cfg"
    Params = CFGParams
    params: CFGParams

    def combine(self, preds: torch.Tensor, attention: dict[str, torch.Tensor], step: StepInfo) -> torch.Tensor:
        uncond, cond = preds[0], preds[1]
        guided = uncond + self.params.scale * (cond - uncond)
        if self.params.rescale > 0:
            guided = rescale_guidance(guided, cond, self.params.rescale)
        return guided
