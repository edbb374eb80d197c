"""The DiADM network: a diffusers ``UNet2DModel`` in pixel space, and how a condition enters it.

One mechanism for every conditional mode: the condition vector ``c`` goes through a linear layer into the
UNet's time-embedding width and is added to the time embedding (``class_embed_type="identity"``: the UNet adds
what it is given). For ``pseudocond`` ``c`` is the training image's feature, L2-normalised and multiplied by
sqrt(dim) (as the official code does before its label embedding); for ``class`` it is the one-hot class times
sqrt(classes), so the linear layer is a class embedding table. The unconditional model is the same UNet without
the projection. A trained model is a folder::

    MODEL/unet/                       the UNet (diffusers folder; the EMA weights)
    MODEL/condition.safetensors       the projection (EMA weights); not for uncond
    MODEL/conditions.safetensors      the raw training features and class labels, in training order
    MODEL/scheduler/                  the training noise schedule (DDPMScheduler)
    MODEL/diadm.json                  the card: mode, embedder, data, settings, loss
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError

MODES = ("pseudocond", "uncond", "class")
CARD = "diadm.json"
UNET_DIR = "unet"
SCHEDULER_DIR = "scheduler"
PROJECTION_FILE = "condition.safetensors"
CONDITIONS_FILE = "conditions.safetensors"
MECHANISM = ("linear projection of the condition vector added to the UNet's time embedding "
             "(UNet2DModel class_embed_type='identity')")
SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon",
            "clip_sample": True}


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise InputError(f"unknown --cond {mode!r}; choose pseudocond (the training image's feature, DiADM), "
                         "uncond (no condition) or class (the image's class)")
    return mode


def unet_config(resolution: int, channels: int, width: int, conditional: bool) -> dict[str, Any]:
    """A small UNet: three levels of ``width``, 2x, 2x channels, self-attention on the lowest level only (on a CPU
    attention at the middle level costs as much as the rest of the network)."""
    if width < 8 or width % 8:
        raise InputError(f"--width must be a multiple of 8 (got {width})")
    if resolution < 8 or resolution % 4:
        raise InputError(f"--resolution must be a multiple of 4, at least 8 (got {resolution})")
    return {
        "sample_size": resolution,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": [width, 2 * width, 2 * width],
        "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
        "layers_per_block": 1,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
        "class_embed_type": "identity" if conditional else None,
    }


def time_embed_dim(config: dict[str, Any]) -> int:
    return config["block_out_channels"][0] * 4  # UNet2DModel's time embedding width


def condition_vectors(mode: str, features: torch.Tensor | None, labels: list[int] | None,
                      classes: int) -> torch.Tensor | None:
    """The vector each image is conditioned on (None for uncond): see the module docstring."""
    if mode == "uncond":
        return None
    if mode == "pseudocond":
        assert features is not None
        x = features.float()
        return torch.nn.functional.normalize(x, dim=1) * math.sqrt(x.shape[1])
    assert labels is not None
    return torch.nn.functional.one_hot(torch.tensor(labels), classes).float() * math.sqrt(classes)


@dataclass
class DiadmModel:
    """A trained (or freshly built) DiADM model: UNet, projection, training conditions and the card."""

    unet: Any
    projection: torch.nn.Linear | None
    card: dict[str, Any]
    features: torch.Tensor | None = None  # raw training features (pseudocond), training order
    labels: list[int] | None = None

    @property
    def mode(self) -> str:
        return self.card["mode"]

    @property
    def cond_dim(self) -> int | None:
        return None if self.projection is None else self.projection.in_features

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None,
                unet: Any = None, projection: torch.nn.Module | None = None) -> torch.Tensor:
        """The predicted noise; ``unet``/``projection`` may be the training core's wrapped modules."""
        unet = self.unet if unet is None else unet
        projection = self.projection if projection is None else projection
        emb = None if cond is None or projection is None else projection(cond.to(x.device))
        return unet(x, t, class_labels=emb).sample


def build(config: dict[str, Any], cond_dim: int | None, seed: int) -> tuple[Any, torch.nn.Linear | None]:
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(**config)
    projection = None if cond_dim is None else torch.nn.Linear(cond_dim, time_embed_dim(config))
    return unet, projection


def save(folder: Path, unet, projection: torch.nn.Linear | None, features: torch.Tensor | None,
         labels: list[int] | None, scheduler, card: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    unet.save_pretrained(folder / UNET_DIR, safe_serialization=True)
    config = folder / UNET_DIR / "config.json"  # no record of the folder it was saved from
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "_name_or_path"},
                                 indent=2, sort_keys=True) + "\n")
    scheduler.save_pretrained(folder / SCHEDULER_DIR)
    if projection is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in projection.state_dict().items()},
                  str(folder / PROJECTION_FILE))
    tensors = {}
    if features is not None:
        tensors["features"] = features.float().contiguous()
    if labels is not None:
        tensors["labels"] = torch.tensor(labels, dtype=torch.int64)
    if tensors:
        save_file(tensors, str(folder / CONDITIONS_FILE))
    card = {**card, "weights_sha256": weights_hash(folder)}
    (folder / CARD).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")


def weights_hash(folder: Path) -> str:
    """sha256 over the weight files: the model's identity in job keys."""
    h = hashlib.sha256()
    for path in sorted([*(folder / UNET_DIR).glob("*.safetensors"), folder / PROJECTION_FILE]):
        if path.is_file():
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def load(folder: str | Path, device: str | torch.device = "cpu") -> DiadmModel:
    """A model folder written by ``diffprobe train diadm``."""
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CARD).is_file():
        hint = (" (training is not finished: run the same `diffprobe train diadm` command to resume)"
                if folder.with_name(f"{folder.name}.training").is_dir() else "")
        raise InputError(f"{folder} is not a DiADM model folder (no {CARD}); train one with "
                         f"`diffprobe train diadm --out {folder}`{hint}")
    card = json.loads((folder / CARD).read_text())
    unet = UNet2DModel.from_pretrained(folder / UNET_DIR).to(device).eval()
    projection = None
    if (folder / PROJECTION_FILE).is_file():
        state = load_file(str(folder / PROJECTION_FILE))
        projection = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
        projection.load_state_dict(state)
        projection = projection.to(device).eval()
    features, labels = None, None
    if (folder / CONDITIONS_FILE).is_file():
        tensors = load_file(str(folder / CONDITIONS_FILE))
        features = tensors.get("features")
        labels = tensors["labels"].tolist() if "labels" in tensors else None
    return DiadmModel(unet, projection, card, features, labels)
