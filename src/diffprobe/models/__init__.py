"""Model adapters: ``load_model("shapes")``, ``load_model("stable-diffusion-v1-5/stable-diffusion-v1-5")``."""

from .adapters import ADAPTERS, DiffusersAdapter, PixArtAdapter, SDAdapter, SDXLAdapter
from .base import Conditioning, ModelAdapter
from .loading import choose_device, choose_dtype, detect_family, load_model

__all__ = [
    "ADAPTERS",
    "Conditioning",
    "DiffusersAdapter",
    "ModelAdapter",
    "PixArtAdapter",
    "SDAdapter",
    "SDXLAdapter",
    "choose_device",
    "choose_dtype",
    "detect_family",
    "load_model",
]
