"""Embedders without learned semantics, as baselines for the extractor study: raw pixels, and a fixed random
projection of them. They show what a metric scores when features know nothing about image content."""

from __future__ import annotations

import torch

from ..models.loading import choose_device
from .base import Embedder, Preprocess

PIXEL_RESOLUTION = 32
PROJECTION_DIM = 512
PROJECTION_SEED = 0


def _pixel_preprocess(resolution: int) -> Preprocess:
    # bilinear square resize of the [0, 1] RGB image, no normalisation
    return Preprocess(resolution, None, (0.0,) * 3, (1.0,) * 3, interpolation="bilinear", resize_mode="square")


class PixelEmbedder(Embedder):
    """The RGB image resized to ``resolution`` x ``resolution``, flattened: 3 * resolution^2 values in [0, 1]."""

    name = "pixels"

    def __init__(self, resolution: int = PIXEL_RESOLUTION, device=None, batch_size: int = 256):
        self.preprocess = _pixel_preprocess(resolution)
        self.dim = 3 * resolution * resolution
        self.weights = "none"
        self.device = choose_device(device)
        self.batch_size = batch_size

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.flatten(1)


class RandomProjectionEmbedder(Embedder):
    """Raw pixels (as ``pixels``) times a fixed Gaussian matrix [3 r^2, dim] / sqrt(dim), drawn from a seeded CPU
    generator so the same seed gives the same matrix everywhere; distances are kept up to a small distortion
    (Johnson-Lindenstrauss), so this is the "no semantics, fewer dimensions" baseline."""

    name = "random-projection"

    def __init__(self, dim: int = PROJECTION_DIM, seed: int = PROJECTION_SEED, resolution: int = PIXEL_RESOLUTION,
                 device=None, batch_size: int = 256):
        self.preprocess = _pixel_preprocess(resolution)
        self.dim = dim
        self.weights = f"gaussian-seed{seed}-dim{dim}"
        self.device = choose_device(device)
        self.batch_size = batch_size
        generator = torch.Generator().manual_seed(seed)
        matrix = torch.randn(3 * resolution * resolution, dim, generator=generator) / dim**0.5
        self.matrix = matrix.to(self.device)

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.flatten(1) @ self.matrix
