"""Image embedders behind one interface, and the feature cache.

``get_embedder(name)`` names: ``clip-vit-b32`` (and other CLIP ids or local CLIP folders, also as
``clip:<id-or-path>``), ``efficientnet-lite0`` (and ``-lite1``, ``-lite2``; ``NAME@SIZE`` sets the input size, e.g.
``efficientnet-lite0@64`` for small images), ``swav`` and ``inception`` (both need ``weights=FILE``),
``inception-torchscript`` (FID's standard TorchScript file, ``weights=FILE`` or ``inception-torchscript:FILE``),
the baselines ``pixels`` and ``random-projection``, and ``auto``: CLIP ViT-B/32 when its weights can be loaded,
else efficientnet-lite0 with a note saying so.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError, ModelNotFoundError
from .base import Embedder, Preprocess
from .cache import FeatureCache, default_cache_dir, embed_files

EMBEDDERS = (
    "auto",
    "clip-vit-b32",
    "clip-vit-b16",
    "clip-vit-l14",
    "efficientnet-lite0",
    "efficientnet-lite1",
    "efficientnet-lite2",
    "swav",
    "inception",
    "inception-torchscript",
    "pixels",
    "random-projection",
)

__all__ = ["EMBEDDERS", "Embedder", "FeatureCache", "Preprocess", "default_cache_dir", "embed_files", "get_embedder"]


def _is_clip_name(name: str) -> bool:
    if name.startswith(("clip:", "clip-")) or "/clip" in name.lower():
        return True
    config = Path(name) / "config.json"
    return config.is_file() and '"clip"' in config.read_text()


def get_embedder(
    name: str = "auto",
    *,
    weights: str | Path | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 64,
    resize: str = "clean",
) -> Embedder:
    """Build an embedder by name. The returned object has ``note`` set when ``auto`` fell back. ``resize`` is the
    FID resize mode of ``inception-torchscript`` (clean, legacy-tensorflow, legacy-pytorch)."""
    note = None
    if name == "auto":
        from .clip import CLIP_ALIASES, CLIPEmbedder, hub_offline

        try:  # only what is already in the local Hugging Face cache: auto never waits on the network
            embedder = CLIPEmbedder("clip-vit-b32", device=device, batch_size=batch_size, local_only=True)
        except ModelNotFoundError:
            embedder = get_embedder("efficientnet-lite0", device=device, batch_size=batch_size)
            hub_id = CLIP_ALIASES["clip-vit-b32"]
            how = (
                f"HF_HUB_OFFLINE is set: to score with CLIP, download {hub_id} where the hub is reachable "
                f"(`hf download {hub_id}`) so it is in the Hugging Face cache, or pass --embedder PATH with a "
                "local CLIP folder"
                if hub_offline()
                else "pass --embedder clip-vit-b32 to download CLIP"
            )
            note = (
                "CLIP ViT-B/32 weights are not in the local Hugging Face cache; used efficientnet-lite0 instead, so "
                f"scores are not comparable with CLIP-based ones ({how})"
            )
        embedder.note = note
        return embedder
    base_name, _, size = name.partition("@")
    if base_name in ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"):
        from .effnet import EfficientNetLite0Embedder

        if size and not (size.isdigit() and 32 <= int(size) <= 1024):
            raise InputError(f"'{name}': the input size after @ must be a whole number of pixels from 32 to 1024")
        embedder = EfficientNetLite0Embedder(
            weights_path=str(weights) if weights else None, device=device, batch_size=batch_size, variant=base_name,
            resolution=int(size) if size else None,
        )
    elif name == "swav":
        from .convnets import SwAVEmbedder

        embedder = SwAVEmbedder(weights, device=device, batch_size=batch_size)
    elif name == "inception":
        from .convnets import InceptionEmbedder

        embedder = InceptionEmbedder(weights, device=device, batch_size=batch_size)
    elif name == "inception-torchscript" or name.startswith("inception-torchscript:"):
        from .torchscript_inception import TorchScriptInceptionEmbedder

        path = name.partition(":")[2] or weights
        embedder = TorchScriptInceptionEmbedder(path, resize=resize, device=device, batch_size=batch_size)
    elif name == "pixels":
        from .baselines import PixelEmbedder

        embedder = PixelEmbedder(device=device)
    elif name == "random-projection":
        from .baselines import RandomProjectionEmbedder

        embedder = RandomProjectionEmbedder(device=device)
    elif _is_clip_name(name):
        from .clip import CLIPEmbedder

        embedder = CLIPEmbedder(name.removeprefix("clip:"), device=device, batch_size=batch_size)
    else:
        raise InputError(
            f"unknown embedder '{name}'; choose one of {', '.join(EMBEDDERS)}, a CLIP hub id or a local CLIP folder"
        )
    embedder.note = note
    return embedder
