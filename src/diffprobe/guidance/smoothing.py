"""The small Gaussian blur S-CFG applies to its attention maps and to its rate map.

The official S-CFG code reuses the Attend-and-Excite smoothing module, whose kernel is
``exp(-((x - mu) / (2 sigma))**2)``: the nominal sigma 0.5 is an effective sigma of 0.5 * sqrt(2).
We reproduce that formula, not the nominal sigma (spec scfg.md, P7).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kernel_1d(size: int = 3, sigma: float = 0.5) -> list[float]:
    """Normalised 1-D weights of the reference formula ``exp(-((x - mu) / (2 sigma))**2)``."""
    g = [math.exp(-(((x - (size - 1) / 2) / (2 * sigma)) ** 2)) for x in range(size)]
    return [v / sum(g) for v in g]


def gaussian_kernel_2d(size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """The (size, size) kernel of the reference code: the outer product of the 1-D weights (sum 1)."""
    g = torch.tensor(gaussian_kernel_1d(size, sigma), dtype=torch.float64)
    return torch.outer(g, g).float()


def gaussian_smooth(maps: torch.Tensor, size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """Blur every (H, W) map of ``maps`` (..., H, W) independently, with reflect padding as the reference does.

    The kernel is separable, so this is two passes of ``size`` shifted adds (much cheaper than a grouped
    convolution over thousands of tiny single-channel maps). Maps too small for reflect padding (a side of
    ``size // 2`` or less) are padded by replication instead.
    """
    pad = size // 2
    shape = maps.shape
    h, w = shape[-2], shape[-1]
    flat = maps.reshape(-1, 1, h, w)
    mode = "reflect" if min(h, w) > pad else "replicate"
    x = F.pad(flat, (pad, pad, pad, pad), mode=mode)
    weights = gaussian_kernel_1d(size, sigma)
    x = sum(wt * x[..., i : i + h, :] for i, wt in enumerate(weights))
    x = sum(wt * x[..., i : i + w] for i, wt in enumerate(weights))
    return x.reshape(shape)
