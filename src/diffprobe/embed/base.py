"""The embedder interface and the image preprocessing shared by all embedders."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import InputError, ModelNotFoundError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model input; part of every feature's cache key.

    ``resize`` sets the short side (``resize_mode="short"``) or both sides (``"square"``, no crop);
    ``crop`` is a center crop; resizing happens in PIL (``backend="pil"``) or with
    ``torch.nn.functional.interpolate`` on the [0, 1] tensor (``backend="torch"``, as pytorch-fid does).
    The [0, 1] tensor is then normalised with ``mean``/``std``.
    """

    resize: int
    crop: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "short"
    backend: str = "pil"

    def describe(self) -> str:
        crop = f"crop{self.crop}" if self.crop else "nocrop"
        mean = ",".join(f"{m:g}" for m in self.mean)
        std = ",".join(f"{s:g}" for s in self.std)
        return f"{self.backend}-{self.interpolation}-{self.resize_mode}{self.resize}-{crop}-mean{mean}-std{std}"

    def to_dict(self) -> dict:
        return asdict(self)

    def _one(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        if self.backend == "pil":
            w, h = image.size
            if self.resize_mode == "square":
                size = (self.resize, self.resize)
            else:  # short side to `resize`, aspect kept
                scale = self.resize / min(w, h)
                size = (max(self.resize, round(w * scale)), max(self.resize, round(h * scale)))
            if (w, h) != size:
                image = image.resize(size, _RESAMPLE[self.interpolation])
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        if self.backend == "torch":
            x = F.interpolate(x[None], size=(self.resize, self.resize), mode=self.interpolation, align_corners=False)[0]
        if self.crop:
            x = _center_crop(x, self.crop)
        return x

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Images of any sizes -> float32 [B, 3, H, W], normalised."""
        tensors = [self._one(im) for im in images]
        if len({t.shape for t in tensors}) > 1:  # only without a crop or square resize
            raise InputError(f"preprocessing '{self.describe()}' gives different sizes for these images; set a crop")
        batch = torch.stack(tensors)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (batch - mean) / std


def _center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    _, h, w = x.shape
    if h < size or w < size:  # only possible with resize < crop; pad like a zero border would be a silent change
        raise ValueError(f"cannot center-crop {h}x{w} to {size}")
    top, left = (h - size) // 2, (w - size) // 2
    return x[:, top : top + size, left : left + size]


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_weights_file(path: str | Path | None, what: str, hint: str) -> Path:
    if path is None:
        raise ModelNotFoundError(f"{what} needs a local weights file: {hint}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(f"{what} weights file not found: {path}. {hint}")
    return path


class Embedder(ABC):
    """Maps images to float32 feature vectors [N, D].

    ``id`` names the model, its weights and its preprocessing; features are cached under it, so two
    embedders with the same ``id`` must give the same features.
    """

    name: str
    dim: int
    preprocess: Preprocess
    weights: str  # short description of the weights (file hash, hub id)
    device: torch.device
    dtype: torch.dtype = torch.float32
    batch_size: int = 64
    note: str | None = None  # e.g. why a fallback embedder was chosen

    @property
    def id(self) -> str:
        return f"{self.name}|{self.weights}|{self.preprocess.describe()}"

    @abstractmethod
    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixel batch on ``self.device`` -> features [B, D]."""

    @torch.inference_mode()
    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed images in batches of ``batch_size``; returns float32 [len(images), dim]."""
        out = np.empty((len(images), self.dim), dtype=np.float32)
        for start in range(0, len(images), self.batch_size):
            pixels = self.preprocess(images[start : start + self.batch_size]).to(self.device, self.dtype)
            out[start : start + len(pixels)] = self._forward(pixels).float().cpu().numpy()
        return out

    def describe(self) -> dict:
        """Provenance recorded next to every score."""
        return {
            "name": self.name,
            "id": self.id,
            "dim": self.dim,
            "weights": self.weights,
            "preprocessing": self.preprocess.to_dict(),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "note": self.note,
        }
