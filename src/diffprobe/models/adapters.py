"""Adapters for the three families: ``sd`` (SD 1.x/2.x), ``sdxl`` and ``pixart`` (PixArt-alpha).

Each wraps the components of a diffusers checkpoint and reproduces exactly what the matching diffusers pipeline
feeds its denoiser (tokenisation, embeddings, micro-conditions), so our sampler's numbers equal the pipeline's.
"""

from __future__ import annotations

import math
import re
from abc import abstractmethod
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from ..errors import ResolutionError
from .base import AttentionLayer, Conditioning, ModelAdapter, Recommended

if TYPE_CHECKING:
    from diffusers import SchedulerMixin


class DiffusersAdapter(ModelAdapter):
    """What the three families share: VAE decoding, identity, scheduler copies, token bookkeeping."""

    denoiser_attr = "unet"

    def __init__(self, pipe: Any, model_id: str, family: str, weights: dict[str, Any]):
        self.pipe = pipe
        self.model_id = model_id
        self.family = family
        self.weights = weights  # revision or weights hash, from the loader
        self.recommended: Recommended = {}  # set by the loader from the checkpoint's diffprobe.json
        self.scheduler_name = "default"
        self.loras: list[dict[str, Any]] = []  # identities of the LoRA adapters applied (set by the loader)
        self.device = pipe.device
        self.dtype = getattr(pipe, self.denoiser_attr).dtype
        self.scheduler = pipe.scheduler
        self.vae = pipe.vae
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = int(self.vae.config.latent_channels)
        sample = int(self.denoiser.config.sample_size)
        self.default_size = (sample * self.vae_scale_factor, sample * self.vae_scale_factor)

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_attr)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (VAE factor times the denoiser's own downsampling)."""
        return self.vae_scale_factor * self.denoiser_factor

    def check_size(self, height: int, width: int) -> None:
        m = self.size_multiple
        if height <= 0 or width <= 0 or height % m or width % m:
            raise ResolutionError(
                f"height and width must be positive multiples of {m} for this model (got {height}x{width}); "
                f"try {max(m, round(height / m) * m)}x{max(m, round(width / m) * m)}"
            )

    def fresh_scheduler(self) -> SchedulerMixin:
        return self.scheduler.__class__.from_config(self.scheduler.config)

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> Conditioning:
        """Encode each distinct text once (branch texts repeat: "" in every CFG pair) and index back."""
        distinct = list(dict.fromkeys(texts))
        position = {text: i for i, text in enumerate(distinct)}
        return self.encode_distinct(distinct).take([position[t] for t in texts])

    @abstractmethod
    def encode_distinct(self, texts: list[str]) -> Conditioning:
        """The family's text encoding of ``texts`` (all different), one row per text."""

    def _tokenize(self, tokenizer, texts: list[str], max_length: int) -> tuple[Any, list[bool], list[list[str]]]:
        ids = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        full_lengths = [len(x) for x in tokenizer(texts, truncation=False).input_ids]
        truncated = [n > max_length for n in full_lengths]
        tokens = [tokenizer.convert_ids_to_tokens(row) for row in ids.input_ids.tolist()]
        return ids, truncated, tokens

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.vae
        latents = latents.to(vae.dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, self.latent_channels, 1, 1)
            mean_t = torch.tensor(mean).view(shape).to(latents)
            std_t = torch.tensor(std).view(shape).to(latents)
            latents = latents * std_t / vae.config.scaling_factor + mean_t
        else:
            latents = latents / vae.config.scaling_factor
        images = vae.decode(latents, return_dict=False)[0]
        arr = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        return [Image.fromarray(x) for x in (arr * 255).round().astype(np.uint8)]

    def identity(self) -> dict[str, Any]:
        # LoRA adapters only when there are some: a model without them keeps the job keys it always had.
        extra = {"lora": self.loras} if self.loras else {}
        return {"model": self.model_id, "family": self.family, **self.weights, **extra}


def _latent_grid(height: int, width: int, factor: int) -> tuple[int, int]:
    return height // factor, width // factor


class SDAdapter(DiffusersAdapter):
    """Stable Diffusion 1.x / 2.x (epsilon or v-prediction), and any checkpoint with that layout."""

    def __init__(self, pipe: Any, model_id: str, family: str = "sd", weights: dict[str, Any] | None = None):
        super().__init__(pipe, model_id, family, weights or {})
        self.denoiser_factor = 2 ** (len(self.denoiser.config.block_out_channels) - 1)
        self.token_limit = int(pipe.tokenizer.model_max_length)

    def encode_distinct(self, texts: list[str]) -> Conditioning:
        tok = self.pipe.tokenizer
        ids, truncated, tokens = self._tokenize(tok, texts, tok.model_max_length)
        encoder = self.pipe.text_encoder
        mask = ids.attention_mask.to(self.device) if getattr(encoder.config, "use_attention_mask", False) else None
        emb = encoder(ids.input_ids.to(self.device), attention_mask=mask)[0].to(self.dtype)
        return Conditioning({"prompt_embeds": emb}, truncated=truncated, tokens=tokens)

    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                denoiser: torch.nn.Module | None = None) -> torch.Tensor:
        return (denoiser or self.denoiser)(latents, t, encoder_hidden_states=cond.tensors["prompt_embeds"],
                                           return_dict=False)[0]

    def attention_layers(self, height: int, width: int) -> list[AttentionLayer]:
        return unet_attention_layers(self.denoiser, *_latent_grid(height, width, self.vae_scale_factor))


class SDXLAdapter(SDAdapter):
    """SDXL: two text encoders (penultimate hidden states concatenated), pooled embedding and size/crop time ids."""

    def __init__(self, pipe: Any, model_id: str, family: str = "sdxl", weights: dict[str, Any] | None = None):
        super().__init__(pipe, model_id, family, weights)
        # The pipeline uses all-zero embeddings, not the encoded "", for the unconditional branch by default.
        self.zeros_for_empty = bool(pipe.config.get("force_zeros_for_empty_prompt", True))
        if self.vae.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False):
            self.vae.to(torch.float32)  # the SDXL VAE overflows in fp16; the pipeline decodes it in fp32 too

    def encode_distinct(self, texts: list[str]) -> Conditioning:
        hidden, truncated, tokens, pooled = [], [False] * len(texts), None, None
        pairs = [(self.pipe.tokenizer, self.pipe.text_encoder), (self.pipe.tokenizer_2, self.pipe.text_encoder_2)]
        for tok, encoder in pairs:
            if tok is None or encoder is None:
                continue
            ids, trunc, toks = self._tokenize(tok, texts, tok.model_max_length)
            truncated = [a or b for a, b in zip(truncated, trunc, strict=True)]
            tokens = tokens or toks
            out = encoder(ids.input_ids.to(self.device), output_hidden_states=True)
            if out[0].ndim == 2:
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        emb = torch.cat(hidden, dim=-1).to(self.dtype)
        pooled = pooled.to(self.dtype)
        if self.zeros_for_empty:
            empty = torch.tensor([t == "" for t in texts], device=emb.device)
            emb = torch.where(empty[:, None, None], torch.zeros_like(emb), emb)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        return Conditioning({"prompt_embeds": emb, "pooled": pooled}, truncated=truncated, tokens=tokens or [])

    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                denoiser: torch.nn.Module | None = None) -> torch.Tensor:
        h, w = (s * self.vae_scale_factor for s in latents.shape[-2:])
        # original size, crop top-left, target size: as the pipeline's defaults for an uncropped h x w image
        time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=self.dtype, device=latents.device).repeat(len(latents), 1)
        added = {"text_embeds": cond.tensors["pooled"], "time_ids": time_ids}
        return (denoiser or self.denoiser)(
            latents, t, encoder_hidden_states=cond.tensors["prompt_embeds"], added_cond_kwargs=added, return_dict=False
        )[0]


class PixArtAdapter(DiffusersAdapter):
    """PixArt-alpha: T5 encoder with attention mask (120 tokens), DiT transformer with learned variance."""

    denoiser_attr = "transformer"
    max_sequence_length = 120

    def __init__(self, pipe: Any, model_id: str, family: str = "pixart", weights: dict[str, Any] | None = None):
        super().__init__(pipe, model_id, family, weights or {})
        self.denoiser_factor = int(self.denoiser.config.patch_size)
        self.token_limit = self.max_sequence_length

    def encode_distinct(self, texts: list[str]) -> Conditioning:
        # Captions are used as given (the pipeline's optional caption cleaning is not applied).
        ids, truncated, tokens = self._tokenize(self.pipe.tokenizer, texts, self.max_sequence_length)
        mask = ids.attention_mask.to(self.device)
        emb = self.pipe.text_encoder(ids.input_ids.to(self.device), attention_mask=mask)[0].to(self.dtype)
        return Conditioning({"prompt_embeds": emb, "attention_mask": mask}, truncated=truncated, tokens=tokens)

    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                denoiser: torch.nn.Module | None = None) -> torch.Tensor:
        n = len(latents)
        added: dict[str, torch.Tensor | None] = {"resolution": None, "aspect_ratio": None}
        if self.denoiser.config.sample_size == 128:  # the 1024 px checkpoints take size micro-conditions
            h, w = (s * self.vae_scale_factor for s in latents.shape[-2:])
            added = {
                "resolution": torch.tensor([[h, w]], dtype=self.dtype, device=latents.device).repeat(n, 1),
                "aspect_ratio": torch.tensor([[h / w]], dtype=self.dtype, device=latents.device).repeat(n, 1),
            }
        timestep = (t if torch.is_tensor(t) else torch.tensor(t)).reshape(-1).to(latents.device)
        if len(timestep) != n:  # sampling: one timestep for the batch; training: one per latent
            timestep = timestep[:1].expand(n)
        out = (denoiser or self.denoiser)(
            latents,
            encoder_hidden_states=cond.tensors["prompt_embeds"],
            encoder_attention_mask=cond.tensors["attention_mask"],
            timestep=timestep,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        if out.shape[1] == 2 * self.latent_channels:  # drop the learned variance
            out = out[:, : self.latent_channels]
        return out

    def attention_layers(self, height: int, width: int) -> list[AttentionLayer]:
        gh, gw = _latent_grid(height, width, self.vae_scale_factor * self.denoiser_factor)
        layers = []
        for name, _ in _attention_modules(self.denoiser):
            layers.append(AttentionLayer(name, "self" if name.endswith("attn1") else "cross", gh, gw))
        return layers


def _attention_modules(model: torch.nn.Module):
    from diffusers.models.attention_processor import Attention

    for name, module in model.named_modules():
        if isinstance(module, Attention) and re.search(r"attn[12]$", name):
            yield name, module


_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^mid_block\.")


def unet_attention_layers(unet: torch.nn.Module, latent_h: int, latent_w: int) -> list[AttentionLayer]:
    """Attention modules of a UNet2DConditionModel and their query grids (each downsampler halves, rounding up)."""
    n_down = len(unet.config.down_block_types)
    grids = [(latent_h, latent_w)]
    for _ in range(n_down - 1):
        h, w = grids[-1]
        grids.append((math.ceil(h / 2), math.ceil(w / 2)))
    layers = []
    for name, _ in _attention_modules(unet):
        m = _BLOCK.match(name)
        if m is None:
            continue
        if m.group(1) == "down_blocks":
            grid = grids[int(m.group(2))]
        elif m.group(1) == "up_blocks":
            grid = grids[n_down - 1 - int(m.group(2))]
        else:
            grid = grids[-1]
        layers.append(AttentionLayer(name, "self" if name.endswith("attn1") else "cross", *grid))
    return layers


ADAPTERS: dict[str, type[DiffusersAdapter]] = {"sd": SDAdapter, "sdxl": SDXLAdapter, "pixart": PixArtAdapter}
