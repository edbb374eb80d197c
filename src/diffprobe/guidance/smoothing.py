"""The small Gaussian blur S-CFG applies to its attention maps and to its rate map.

The official S-CFG code reuses the Attend-and-Excite smoothing module, whose kernel is
``exp(-((x - mu) / (2 sigma))**2)``: the nominal sigma 0.5 is an effective sigma of 0.5 * sqrt(2).
We reproduce that formula, not the nominal sigma (spec scfg.md, P7).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_kernel_2d(size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """The (size, size) kernel of the reference code: product of 1-D ``exp(-((x-mu)/(2 sigma))^2)``, sum 1."""
    x = torch.arange(size, dtype=torch.float64)
    g = torch.exp(-(((x - (size - 1) / 2) / (2 * sigma)) ** 2))
    kernel = torch.outer(g, g)
    return (kernel / kernel.sum()).float()


def gaussian_smooth(maps: torch.Tensor, size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """Blur every (H, W) map of ``maps`` (..., H, W) independently, with reflect padding as the reference does.

    Maps too small for reflect padding (a side of ``size // 2`` or less) are padded by replication instead.
    """
    pad = size // 2
    shape = maps.shape
    flat = maps.reshape(-1, 1, shape[-2], shape[-1])
    mode = "reflect" if min(shape[-2], shape[-1]) > pad else "replicate"
    flat = F.pad(flat, (pad, pad, pad, pad), mode=mode)
    kernel = gaussian_kernel_2d(size, sigma).to(device=maps.device, dtype=maps.dtype)
    return F.conv2d(flat, kernel[None, None]).reshape(shape)
