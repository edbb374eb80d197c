"""Architecture of the shapes-world model and the builder of its Stable-Diffusion-style folder.

64 px RGB images, a KL autoencoder of factor 2 (32x32x4 latents), a UNet with cross-attention at 16x16, 8x8 and
4x4 (plus the 4x4 mid block), a small CLIP text encoder trained from scratch, and a word-level tokenizer over the
grammar's vocabulary that keeps CLIP's layout (BOS at position 0, EOS then EOS-padding).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from .grammar import vocabulary

RESOLUTION = 64
LATENT_CHANNELS = 4
MAX_TOKENS = 24  # BOS + the longest caption (19 words) + EOS, with room to spare
BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, sample_size=RESOLUTION,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16, mid_block_add_attention=False,
)
UNET_CONFIG = dict(
    sample_size=RESOLUTION // 2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 96, 96), layers_per_block=1, norm_num_groups=8,
    cross_attention_dim=128, attention_head_dim=4,
)
TEXT_CONFIG = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=MAX_TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=128,
)
# Stable Diffusion's noise schedule, so the folder behaves like an SD checkpoint.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate([BOS, EOS, UNK, *vocabulary()])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=EOS,
                                   model_max_length=MAX_TOKENS)


def build_models(seed: int = 0) -> dict[str, torch.nn.Module]:
    """Freshly initialised VAE, UNet and text encoder (deterministic for a seed)."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    vocab_size = len(build_tokenizer())
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, **TEXT_CONFIG))
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder}


def build_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULER_CONFIG)


def save_pipeline(folder: str | Path, vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
                  dtype: torch.dtype = torch.float32) -> Path:
    """Write a folder that ``diffusers.StableDiffusionPipeline.from_pretrained`` loads (safetensors weights)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, module in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder)):
        if dtype != torch.float32:
            module.to(dtype)
        module.save_pretrained(folder / name, safe_serialization=True)
        module.float()
        config = folder / name / "config.json"  # diffusers records the folder it loaded from; a shipped one must not
        config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items()
                                      if k != "_name_or_path"}, indent=2, sort_keys=True) + "\n")
    build_tokenizer().save_pretrained(folder / "tokenizer")
    build_scheduler().save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": _diffusers_version(),
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def parameter_counts(models: dict[str, torch.nn.Module]) -> dict[str, int]:
    return {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
