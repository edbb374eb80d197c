"""Renderer of the shapes world: flat, axis-aligned shapes on a white background.

A :class:`Scene` is a tuple of :class:`Shape` records (kind, colour, size, centre). Rendering is analytic: each pixel's
coverage comes from the signed distance to the shape's edge (one-pixel anti-aliasing), so a batch of scenes renders as a
few vectorised tensor operations on the CPU or a GPU, and the same scene gives the same pixels everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

#: Palette (sRGB, 0-255). Colours are far apart along every white-to-colour line, which the judge relies on.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 135, 10),
    "yellow": (230, 205, 0),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "purple": (140, 50, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Half-extent of a shape's bounding box, as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.085, "medium": 0.12, "big": 0.165}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
DEFAULT_RESOLUTION = 64


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    color: str  # a key of COLORS
    size: str  # a key of SIZES
    x: float  # bounding-box centre, fraction of the width (0 = left)
    y: float  # bounding-box centre, fraction of the height (0 = top)

    @property
    def half(self) -> float:
        return SIZES[self.size]


Scene = tuple[Shape, ...]

_KIND_INDEX = {k: i for i, k in enumerate(SHAPES)}


def pack(scenes: list[Scene], slots: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scenes -> (params[B, S, 5] = x, y, half, kind, valid ; colours[B, S, 3] in 0..1), S = ``slots`` or the most."""
    slots = slots or max(1, max((len(s) for s in scenes), default=1))
    params = np.zeros((len(scenes), slots, 5), np.float32)
    colors = np.zeros((len(scenes), slots, 3), np.float32)
    for b, scene in enumerate(scenes):
        for i, sh in enumerate(scene):
            params[b, i] = (sh.x, sh.y, sh.half, _KIND_INDEX[sh.kind], 1.0)
            colors[b, i] = np.asarray(COLORS[sh.color], np.float32) / 255.0
    return torch.from_numpy(params), torch.from_numpy(colors)


def render_tensor(scenes: list[Scene], resolution: int = DEFAULT_RESOLUTION, device: str | torch.device = "cpu"
                  ) -> torch.Tensor:
    """Render a batch of scenes to a float tensor [B, 3, H, W] in 0..1."""
    params, colors = pack(scenes)
    return render_packed(params.to(device), colors.to(device), resolution)


def render_packed(params: torch.Tensor, colors: torch.Tensor, resolution: int = DEFAULT_RESOLUTION) -> torch.Tensor:
    """Render packed scenes (see :func:`pack`) on their device to [B, 3, H, W] floats in 0..1."""
    device = params.device
    n = resolution
    coord = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n  # pixel centres
    py, px = coord.view(1, 1, n, 1), coord.view(1, 1, 1, n)
    x, y, h, kind, valid = (params[..., i, None, None] for i in range(5))
    dx, dy = px - x, py - y
    # Signed distances (in image fractions; negative inside) for each kind; pick the shape's own.
    d_circle = torch.sqrt(dx * dx + dy * dy) - h
    d_square = torch.maximum(dx.abs(), dy.abs()) - h
    # Upright isosceles triangle in the box: apex (x, y-h), base corners (x±h, y+h). Edges' outward normals
    # are (±2, -1)/sqrt(5) for the sides and (0, 1) for the base.
    side = (2 * dx.abs() - (dy + h)) / 5**0.5
    d_triangle = torch.maximum(side, dy - h)
    dist = torch.where(kind == 0, d_circle, torch.where(kind == 1, d_square, d_triangle))
    cover = (0.5 - dist * n).clamp(0, 1) * valid  # [B, S, H, W], one-pixel anti-aliased edge
    total = cover.sum(1, keepdim=True).clamp(max=1)
    ink = torch.einsum("bshw,bsc->bchw", cover, colors)
    bg = torch.tensor(BACKGROUND, device=device, dtype=torch.float32).view(1, 3, 1, 1) / 255.0
    return (ink + (1 - total) * bg).clamp(0, 1)


def render(scene: Scene, resolution: int = DEFAULT_RESOLUTION) -> Image.Image:
    """Render one scene to an RGB PIL image."""
    return to_pil(render_tensor([scene], resolution))[0]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] floats in 0..1 -> PIL images."""
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
