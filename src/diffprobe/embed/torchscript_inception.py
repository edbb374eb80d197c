"""FID's standard network: the Inception-v3 TorchScript file ``inception-2015-12-05.pt`` that clean-fid and the
StyleGAN family use, loaded with ``torch.jit.load`` from a local path (no pickled Python objects).

The file's module is called in two ways, and the resize mode picks one:

* ``clean`` (clean-fid's default): each channel is resized to 299x299 with PIL bicubic on float values (no
  rounding back to 8 bits), scaled to ``(x - 128) / 128`` and passed to the ``layers`` submodule, whose output
  is the 2048-d pool3 feature;
* ``legacy-tensorflow``: the image at its own size, values in [0, 255], goes to
  ``module(x, return_features=True)``, which resizes inside the network like the original TensorFlow graph;
* ``legacy-pytorch``: bilinear ``torch.nn.functional.interpolate`` to 299x299, then ``layers`` as in ``clean``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import InputError
from ..models.loading import choose_device
from .base import Embedder, Preprocess, check_weights_file, file_sha256

RESIZE_MODES = ("clean", "legacy-tensorflow", "legacy-pytorch")
SIZE = 299
FILE_HINT = (
    "give the path of inception-2015-12-05.pt (the TorchScript Inception that clean-fid and StyleGAN2-ADA "
    "download) with --inception FILE"
)


@dataclass(frozen=True)
class FIDResize(Preprocess):
    """Preprocessing of the TorchScript Inception; ``mode`` is one of RESIZE_MODES."""

    mode: str = "clean"

    def describe(self) -> str:
        return f"cleanfid-{self.mode}" + ("" if self.mode == "legacy-tensorflow" else f"-{SIZE}")

    def _one(self, image: Image.Image) -> torch.Tensor:
        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
        if self.mode == "clean":
            channels = [_resize_float(pixels[:, :, c]) for c in range(3)]
            return torch.from_numpy(np.stack(channels)) / 255.0
        x = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255.0
        if self.mode == "legacy-pytorch":
            x = F.interpolate(x[None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0]
        return x


def _resize_float(channel: np.ndarray) -> np.ndarray:
    """One channel, as 32-bit float values (PIL mode F), bicubic to SIZE x SIZE: no rounding to 8 bits."""
    image = Image.fromarray(channel.astype(np.float32))
    return np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BICUBIC))


def fid_resize(mode: str) -> FIDResize:
    if mode not in RESIZE_MODES:
        raise InputError(f"unknown FID resize mode '{mode}'; choose one of {', '.join(RESIZE_MODES)}")
    if mode == "legacy-tensorflow":  # the network takes [0, 255] values and normalises itself
        return FIDResize(SIZE, None, (0.0,) * 3, (1 / 255,) * 3, mode=mode)
    # (x - 128) / 128 on [0, 255] values, written as a normalisation of the [0, 1] tensor
    return FIDResize(SIZE, None, (128 / 255,) * 3, (128 / 255,) * 3, mode=mode)


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    try:
        net = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as err:
        raise InputError(
            f"{path} is not a TorchScript file ({' '.join(str(err).split())[:160]}); {FILE_HINT}"
        ) from None
    if not hasattr(net, "layers"):
        raise InputError(f"{path} is a TorchScript module without the 'layers' submodule of the FID Inception; "
                         f"{FILE_HINT}")
    return net.eval()


class TorchScriptInceptionEmbedder(Embedder):
    """2048-d pool3 features of the standard FID Inception; ``id`` names the file's hash and the resize mode."""

    name = "inception-torchscript"

    def __init__(self, weights_path, resize: str = "clean", device=None, batch_size: int = 64):
        path = check_weights_file(weights_path, "the FID Inception (TorchScript)", FILE_HINT)
        self.preprocess = fid_resize(resize)
        self.net = load_torchscript(path)
        self.device = choose_device(device)
        self.net.to(self.device)
        self.batch_size = batch_size
        self.weights = f"sha256:{file_sha256(path)[:16]}"
        self.path = str(path)
        with torch.inference_mode():  # the feature size, from the network itself (2048 for the real file)
            probe = self.preprocess([Image.new("RGB", (SIZE, SIZE))]).to(self.device)
            self.dim = int(self._forward(probe).shape[1])

    def embed(self, images) -> np.ndarray:
        if self.preprocess.mode == "legacy-tensorflow" and len({im.size for im in images}) > 1:
            # the network resizes inside, so images of different sizes go through one at a time
            return np.concatenate([super(TorchScriptInceptionEmbedder, self).embed([im]) for im in images])
        return super().embed(images)

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.preprocess.mode == "legacy-tensorflow":
            feats = self.net(pixels, return_features=True)
        else:
            feats = self.net.layers(pixels)
        return feats.reshape(len(pixels), -1)

    def describe(self) -> dict:
        return {**super().describe(), "resize": self.preprocess.mode}
