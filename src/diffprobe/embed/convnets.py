"""Embedders from local weights files: SwAV ResNet-50 (2048-d avg-pool) and FID Inception-v3 (2048-d pool3).

Both networks are defined here with the parameter names of the public checkpoints, so the files load
with ``torch.load(..., weights_only=True)`` and a strict key check; torchvision is not needed.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, ModelNotFoundError
from ..models.loading import choose_device
from .base import IMAGENET_MEAN, IMAGENET_STD, Embedder, Preprocess, check_weights_file, file_sha256

# ---------------------------------------------------------------- ResNet-50 (torchvision names)


class Bottleneck(nn.Module):
    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        c_out = width * 4
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return F.relu(h + (self.downsample(x) if self.downsample is not None else x))


class ResNet50Trunk(nn.Module):
    """ResNet-50 without the classifier; ``forward`` returns the 2048-d global average pool."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        c_in, layers = 64, []
        for width, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
            stage = [Bottleneck(c_in, width, stride)] + [Bottleneck(width * 4, width, 1) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*stage))
            c_in = width * 4
        self.layer1, self.layer2, self.layer3, self.layer4 = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))


def swav_state_dict(raw: dict) -> dict[str, torch.Tensor]:
    """Backbone weights from a SwAV checkpoint: unwrap ``state_dict``, strip ``module.``, drop the heads."""
    state = raw.get("state_dict", raw)
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith(("projection_head.", "prototypes.", "fc.")):
            continue
        out[key] = value
    return out


# ---------------------------------------------------------------- FID Inception-v3 (pytorch-fid names)


class BasicConv(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: torch.Tensor) -> torch.Tensor:
    # The TF FID graph averages over valid pixels only at the borders.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, c_in: int, pool: int):
        super().__init__()
        self.branch1x1 = BasicConv(c_in, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = BasicConv(c_in, 48, 1), BasicConv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, padding=1)
        self.branch_pool = BasicConv(c_in, pool, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg3(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = BasicConv(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, c_in: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv(c_in, 192, 1)
        self.branch7x7_1 = BasicConv(c_in, c7, 1)
        self.branch7x7_2 = BasicConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv(c_in, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, self.branch7x7dbl_5(d), self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = BasicConv(c_in, 192, 1), BasicConv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, c_in: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool  # the last block of the FID graph max-pools its pool branch
        self.branch1x1 = BasicConv(c_in, 320, 1)
        self.branch3x3_1 = BasicConv(c_in, 384, 1)
        self.branch3x3_2a = BasicConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv(c_in, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """Inception-v3 as in the TF FID graph; ``forward`` returns the 2048-d pool3 features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, max_pool=False), InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # the FID checkpoint's 1008-way logits; unused for features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))


# ---------------------------------------------------------------- embedders


def _load_strict(net: nn.Module, state: dict, what: str, path: Path) -> None:
    expected = set(net.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ModelNotFoundError(
            f"{path} does not hold {what} weights: {len(missing)} missing keys (e.g. {sorted(missing)[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {sorted(unexpected)[:3]})"
        )
    net.load_state_dict(state, strict=True)


class _FileEmbedder(Embedder):
    what: str
    hint: str

    def __init__(self, weights_path, device=None, batch_size: int = 64):
        path = check_weights_file(weights_path, self.what, self.hint)
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # any unpickling failure means the file is not a plain tensor checkpoint
            raise InputError(f"cannot load {path} as a weights-only torch checkpoint "
                             f"({type(err).__name__}: {err})") from err
        self.net = self._build()
        try:
            _load_strict(self.net, self._state(raw), self.what, path)
        except (AttributeError, TypeError, ValueError, RuntimeError) as err:  # not a dict of matching tensors
            raise InputError(f"{path} does not hold {self.what} weights ({type(err).__name__}: "
                             f"{' '.join(str(err).split())[:200]})") from err
        self.device = choose_device(device)
        self.net.eval().to(self.device)
        self.batch_size = batch_size
        self.weights = f"sha256:{file_sha256(path)[:16]}"

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)


class SwAVEmbedder(_FileEmbedder):
    name = "swav"
    dim = 2048
    what = "SwAV ResNet-50"
    hint = "download swav_800ep_pretrain.pth.tar (facebookresearch/swav) and pass --weights PATH"
    # BeyondFID: Resize(512)+CenterCrop(512) at load time, then Resize(224) on the short side.
    preprocess = Preprocess(224, 224, IMAGENET_MEAN, IMAGENET_STD, interpolation="bilinear")

    def _build(self) -> nn.Module:
        return ResNet50Trunk()

    def _state(self, raw: dict) -> dict:
        return swav_state_dict(raw)


class InceptionEmbedder(_FileEmbedder):
    name = "inception"
    dim = 2048
    what = "FID Inception-v3"
    hint = "download pt_inception-2015-12-05-6726825d.pth (pytorch-fid release) and pass --weights PATH"
    # pytorch-fid: bilinear resize of the [0, 1] tensor to 299x299, then scale to [-1, 1].
    preprocess = Preprocess(
        299, None, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), interpolation="bilinear", resize_mode="square", backend="torch"
    )

    def _build(self) -> nn.Module:
        return FIDInception()

    def _state(self, raw: dict) -> dict:
        return raw.get("state_dict", raw)
