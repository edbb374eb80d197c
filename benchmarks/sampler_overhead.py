"""Time per image of diffprobe's sampling loop relative to the diffusers pipeline, same model and settings.

    python benchmarks/sampler_overhead.py                      # tiny random SD checkpoint, CPU
    python benchmarks/sampler_overhead.py --model sd15-random  # full-size SD 1.5 architecture, random weights
    python benchmarks/sampler_overhead.py --model PATH_OR_HUB_ID

Both runs start from the same initial latents, use CFG 7.5, the checkpoint's scheduler, and decode to PIL images.
Runs alternate (ours, theirs, ours, ...) and the median per-image time of each is reported.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from diffprobe.guidance import CFG
from diffprobe.models import load_model
from diffprobe.models.tiny import build_tiny_sd
from diffprobe.sampling import initial_latents, sample


def build_sd15_random(path: Path) -> Path:
    """SD 1.5's UNet, VAE and text-encoder architecture with random weights (no download needed)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from diffprobe.models.tiny import _write_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    text = CLIPTextModel(
        CLIPTextConfig(vocab_size=49408, hidden_size=768, num_hidden_layers=12, bos_token_id=0, eos_token_id=1)
    )
    _write_clip_tokenizer(path / "tokenizer")
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer"),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, sd15-random, or a checkpoint folder / hub id")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=None, help="image height and width (default: the model's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model == "tiny":
            model = str(build_tiny_sd(Path(tmp) / "tiny"))
        elif model == "sd15-random":
            model = str(build_sd15_random(Path(tmp) / "sd15"))
        adapter = load_model(model, device=args.device, dtype=args.dtype)
        size = args.size or adapter.default_size[0]
        prompts = [f"a photo of object number {i}" for i in range(args.batch)]
        seeds = list(range(args.batch))
        start = initial_latents(adapter, seeds, size, size)
        guider = CFG(7.5)

        def ours() -> None:
            sample(adapter, guider, prompts, seeds, steps=args.steps, height=size, width=size)

        def theirs() -> None:
            adapter.pipe(
                prompts,
                num_inference_steps=args.steps,
                guidance_scale=7.5,
                latents=start.clone(),
                height=size,
                width=size,
            )

        ours(), theirs()  # warm-up (kernels, allocator)
        times: dict[str, list[float]] = {"diffprobe": [], "diffusers": []}
        for _ in range(args.repeats):
            for name, fn in (("diffprobe", ours), ("diffusers", theirs)):
                _sync(adapter.device)
                t0 = time.perf_counter()
                fn()
                _sync(adapter.device)
                times[name].append((time.perf_counter() - t0) / args.batch)

        # Same inputs, same numbers: the loops must agree, not only take the same time.
        mine = sample(adapter, guider, prompts, seeds, steps=args.steps, height=size, width=size, decode=False).latents
        ref = adapter.pipe(
            prompts,
            num_inference_steps=args.steps,
            guidance_scale=7.5,
            latents=start.clone(),
            height=size,
            width=size,
            output_type="latent",
        ).images
        max_diff = (mine.float() - ref.float()).abs().max().item()

    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"model={args.model} device={adapter.device} dtype={adapter.dtype} size={size} steps={args.steps} "
        f"batch={args.batch} repeats={args.repeats}"
    )
    for name, value in med.items():
        print(f"{name:10s} {value * 1000:9.1f} ms/image  (runs: {', '.join(f'{t * 1000:.1f}' for t in times[name])})")
    print(f"final latents: max |diffprobe - diffusers| = {max_diff:.2e}")
    print(f"ratio diffprobe/diffusers = {med['diffprobe'] / med['diffusers']:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
