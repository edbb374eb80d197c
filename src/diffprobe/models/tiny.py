"""Tiny random models in diffusers format, for tests, benchmarks and ``diffprobe doctor``.

Each builder writes a complete checkpoint folder that loads through ``diffprobe.models.load_model`` and through the
matching diffusers pipeline, exactly like a real hub checkpoint. The UNets mirror their family's block layout
(cross-attention at latent/1, /2, /4 and in the mid block at /8 for SD) so attention-based guiders see the same
structure as on full-size models.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Byte-level BPE vocabularies need every printable byte as a token; with no merges each word is spelled out.
_BYTE_CHARS = [chr(c) for c in list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))]


def _write_clip_tokenizer(path: Path, max_length: int = 77) -> None:
    from transformers import CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _BYTE_CHARS:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(
        str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=max_length, pad_token="<|endoftext|>"
    )
    tok.save_pretrained(path)


def _clip_text_config(hidden: int = 16, projection: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(_BYTE_CHARS) * 2 + 2,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=projection or hidden,
    )


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
    )


def _scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def build_tiny_sd(path: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """A tiny SD 1.x-layout checkpoint: 16x16 latents (32 px images), cross-attention at 16, 8, 4 and mid 2."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    path = Path(path)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=16,
        attention_head_dim=2,
    )
    pipe = _sd_pipeline(path, unet, CLIPTextModel(_clip_text_config(16)), _tiny_vae(), _scheduler(prediction_type))
    pipe.save_pretrained(path)
    return path


def _sd_pipeline(folder: Path, unet, text_encoder, vae, scheduler):
    """A StableDiffusionPipeline from parts, with a byte-level CLIP tokenizer written to ``folder/tokenizer``."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    _write_clip_tokenizer(folder / "tokenizer")
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sd15_random_pipeline(
    folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, light_vae: bool = False
):
    """SD 1.5's UNet, text encoder and VAE architecture with random weights, built in memory on ``device``
    (for benchmarks: no download, no checkpoint round trip). ``light_vae`` keeps the VAE's factor 8 with
    few channels, for timing the denoising loop alone. ``folder`` receives the tokenizer files."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    channels = (8, 8, 8, 8) if light_vae else (128, 256, 512, 512)
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        text = CLIPTextModel(
            CLIPTextConfig(vocab_size=49408, hidden_size=768, num_hidden_layers=12, bos_token_id=0, eos_token_id=1)
        )
        vae = AutoencoderKL(
            block_out_channels=channels,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            norm_num_groups=4 if light_vae else 32,
            layers_per_block=1 if light_vae else 2,
            sample_size=512,
        )
    return _sd_pipeline(Path(folder), unet, text, vae, _scheduler()).to(device, dtype)


def build_tiny_sdxl(path: str | Path, seed: int = 0) -> Path:
    """A tiny SDXL-layout checkpoint: two text encoders (pooled + time ids), 16x16 latents."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=32,
        attention_head_dim=(2, 2, 2),
        transformer_layers_per_block=(1, 1, 1),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + 16,
    )
    _write_clip_tokenizer(path / "tokenizer")
    _write_clip_tokenizer(path / "tokenizer_2")
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_clip_text_config(16)),
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(16, projection=16)),
        tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(path / "tokenizer_2"),
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(path)
    return path


def _write_t5_tokenizer(path: Path, max_length: int = 120) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'-":
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )
    tok.save_pretrained(path)


def build_tiny_pixart(path: str | Path, seed: int = 0) -> Path:
    """A tiny PixArt-alpha-layout checkpoint: T5 encoder with attention mask, DiT on 16x16 latents (patch 2)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    path = Path(path)
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=16,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=32,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=16,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    text_encoder = T5EncoderModel(
        T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
    )
    _write_t5_tokenizer(path / "tokenizer")
    pipe = PixArtAlphaPipeline(
        tokenizer=AutoTokenizer.from_pretrained(path / "tokenizer"),
        text_encoder=text_encoder,
        vae=_tiny_vae(),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    pipe.save_pretrained(path)
    return path


def build_tiny_owl(path: str | Path, version: str = "owlvit", seed: int = 0, image_size: int = 64) -> Path:
    """A tiny random OWL-ViT (``version="owlvit"``) or OWLv2 (``"owlv2"``) detector with its processor, saved with
    save_pretrained so that ``AutoProcessor`` and ``AutoModelForZeroShotObjectDetection`` load it from ``path``.
    Its vision tower sees ``image_size`` pixels in 16-pixel patches: (image_size / 16)^2 boxes per image."""
    import transformers
    from transformers import CLIPTokenizer

    if version not in ("owlvit", "owlv2"):
        raise ValueError(f"unknown OWL version {version!r}; use owlvit or owlv2")
    prefix = "OwlViT" if version == "owlvit" else "Owlv2"
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # OWL treats a query whose first token id is 0 as padding, so the special tokens come after the characters.
    vocab = {}
    for ch in _BYTE_CHARS:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=32,
                              pad_token="!")  # OWL pads with id 0
    eos = vocab["<|endoftext|>"]
    config = getattr(transformers, f"{prefix}Config")(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=eos - 1,
                         eos_token_id=eos, pad_token_id=0),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=16),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    getattr(transformers, f"{prefix}ForObjectDetection")(config).save_pretrained(path)
    image_processor = getattr(transformers, f"{prefix}ImageProcessorPil")(
        size={"height": image_size, "width": image_size})
    getattr(transformers, f"{prefix}Processor")(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(
        path)
    return path


def build_tiny_grounding_dino(path: str | Path, seed: int = 0) -> Path:
    """A tiny random Grounding DINO (Swin backbone, BERT text tower, 10 queries) with a word-level BERT tokenizer of a
    few nouns, saved with save_pretrained for ``AutoProcessor`` and ``AutoModelForZeroShotObjectDetection``."""
    import transformers
    from transformers import BertTokenizerFast, GroundingDinoConfig, GroundingDinoForObjectDetection

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "photo", "of", "cat", "dog", "circle", "square",
             "triangle", "apple", "red", "blue"]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    config = GroundingDinoConfig(
        backbone_config=dict(model_type="swin", embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=2,
                             image_size=32, patch_size=4, out_features=["stage1", "stage2"], out_indices=[1, 2]),
        text_config=dict(model_type="bert", vocab_size=len(words), hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32, max_position_embeddings=64),
        num_queries=10, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, d_model=32, num_feature_levels=2, encoder_n_points=1,
        decoder_n_points=1, max_text_len=32,
    )
    torch.manual_seed(seed)
    GroundingDinoForObjectDetection(config).save_pretrained(path)
    image_processor = transformers.GroundingDinoImageProcessorPil(size={"shortest_edge": 32, "longest_edge": 48})
    transformers.GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def sd_shaped_random_pipeline(
    folder: str | Path,
    block_out_channels: tuple[int, ...] = (32, 64, 128, 128),
    cross_attention_dim: int = 128,
    sample_size: int = 32,
    device: str | torch.device = "cpu",
    seed: int = 0,
):
    """SD 1.x's UNet layout (three cross-attention down blocks, a plain one, mid, the mirror image up, two layers per
    block) at a chosen width, with a small text encoder and a few-channel VAE of factor 8, built in memory (for
    benchmarks of training at a size a CPU can take). ``folder`` receives the tokenizer files."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=sample_size, block_out_channels=block_out_channels,
                                    cross_attention_dim=cross_attention_dim, attention_head_dim=8,
                                    norm_num_groups=min(32, block_out_channels[0]))
        text = CLIPTextModel(_clip_text_config(cross_attention_dim))
        vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4, layers_per_block=1,
                            sample_size=sample_size * 8)
    return _sd_pipeline(Path(folder), unet, text, vae, _scheduler()).to(device)
