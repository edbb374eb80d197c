"""CLIP image and text embeddings through transformers ``CLIPModel`` (hub id or local folder)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelNotFoundError
from ..models.libraries import quiet_libraries
from ..models.loading import choose_device
from .base import CLIP_MEAN, CLIP_STD, Embedder, Preprocess

# Short names for the common OpenAI checkpoints; anything else is passed to from_pretrained as is.
CLIP_ALIASES = {
    "clip-vit-b32": "openai/clip-vit-base-patch32",
    "clip-vit-b16": "openai/clip-vit-base-patch16",
    "clip-vit-l14": "openai/clip-vit-large-patch14",
}


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set, read as huggingface_hub reads it (1, ON, YES, TRUE)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


SAVED_FOLDER = "a local folder saved with CLIPModel.save_pretrained (with its tokenizer and image processor)"


def weights_hint(source: str, cache_only: bool = False) -> str:
    """How to make the CLIP weights ``source`` available, in the user's situation (offline, cache only, online).
    Commands name CLIP by different options, so the hint says what to give in place of ``source``."""
    if Path(source).is_dir():
        return f"{source} must be {SAVED_FOLDER}"
    download = f"`hf download {source}`"
    instead = f"or give {SAVED_FOLDER} in its place"
    if hub_offline():
        return (f"HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache: download it where the hub is "
                f"reachable ({download}) so it is in the Hugging Face cache, {instead}")
    if cache_only:
        return f"it is not in the local Hugging Face cache: download it ({download}), {instead}"
    return (f"it downloads from the hub on first use: check the id and that huggingface.co is reachable "
            f"({download} says why not), {instead}")


class CLIPEmbedder(Embedder):
    """Image features are the projected CLIP image embeddings, not L2-normalised (as in the SCS code).

    Preprocessing reads the checkpoint's image-processor config (short side resize, center crop,
    mean/std) and applies it with PIL bicubic resizing.
    """

    def __init__(
        self,
        name_or_path: str = "clip-vit-b32",
        device: str | torch.device | None = None,
        batch_size: int = 64,
        dtype: torch.dtype | None = None,
        local_only: bool = False,
    ):
        import transformers
        from transformers import AutoTokenizer, CLIPModel

        # only the processor's settings are read; the PIL variant avoids an optional torchvision dependency
        processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor

        source = CLIP_ALIASES.get(name_or_path, name_or_path)
        local_only = local_only or hub_offline() or Path(source).is_dir()
        try:
            with quiet_libraries(f"CLIP {source}"):  # our progress only; --verbose shows the libraries' output
                self.model = CLIPModel.from_pretrained(source, local_files_only=local_only)
                self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
                processor = processor_cls.from_pretrained(source, local_files_only=local_only)
        except (OSError, ValueError) as err:
            raise ModelNotFoundError(
                f"CLIP weights '{source}' are not available ({type(err).__name__}): {weights_hint(source, local_only)}"
            ) from err
        self.device = choose_device(device)
        self.dtype = dtype or torch.float32
        self.model.eval().to(self.device, self.dtype)
        self.batch_size = batch_size
        self.name = f"clip:{name_or_path}"
        self.weights = source if not Path(source).is_dir() else f"local:{Path(source).resolve()}"
        self.dim = self.model.config.projection_dim
        self.max_tokens = self.model.config.text_config.max_position_embeddings
        size = processor.size.get("shortest_edge") or processor.size.get("height")
        crop = processor.crop_size.get("height") if processor.do_center_crop else None
        self.preprocess = Preprocess(
            resize=int(size),
            crop=int(crop) if crop else None,
            mean=tuple(processor.image_mean or CLIP_MEAN),
            std=tuple(processor.image_std or CLIP_STD),
            interpolation="bicubic",
        )

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return self.model.visual_projection(pooled)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Token counts including the start/end tokens, before any truncation."""
        return [len(ids) for ids in self.tokenizer(list(texts), truncation=False)["input_ids"]]

    @torch.inference_mode()
    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """Projected text embeddings [len(texts), D]; texts longer than the context are truncated (the caller
        reports which ones via ``count_tokens``)."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            ).to(self.device)
            pooled = self.model.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            out[start : start + len(batch["input_ids"])] = (
                self.model.text_projection(pooled.pooler_output).float().cpu().numpy()
            )
        return out
