"""Model adapters: ``load_model("shapes")``, ``load_model("stable-diffusion-v1-5/stable-diffusion-v1-5")``.

Built-in models register themselves by name (:func:`register_model`); :class:`ModelAdapter` is everything the
sampler and the generation driver know of a model.
"""

from .adapters import ADAPTERS, DiffusersAdapter, PixArtAdapter, SDAdapter, SDXLAdapter
from .base import DEFAULT_STEPS, AttentionLayer, Conditioning, ModelAdapter, Recommended
from .loading import choose_device, choose_dtype, detect_family, load_model
from .registry import available_models, register_model

__all__ = [
    "ADAPTERS",
    "DEFAULT_STEPS",
    "AttentionLayer",
    "Conditioning",
    "DiffusersAdapter",
    "ModelAdapter",
    "PixArtAdapter",
    "Recommended",
    "SDAdapter",
    "SDXLAdapter",
    "available_models",
    "choose_device",
    "choose_dtype",
    "detect_family",
    "load_model",
    "register_model",
]
