"""The denoising loop: one batched model call per step over every guider branch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from PIL import Image

from ..errors import InputError
from ..guidance.base import BatchContext, Guider, StepInfo
from ..models.base import Conditioning, ModelAdapter
from .attention import AttentionCapture, capture_attention


@dataclass
class SampleResult:
    images: list[Image.Image]
    latents: torch.Tensor  # final latents (B, C, h, w), before decoding
    records: list[dict[str, Any]] = field(default_factory=list)  # the guider's per-sample records
    truncated: list[bool] = field(default_factory=list)  # per sample: a branch text exceeded the token limit


def _predict(
    adapter: ModelAdapter,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Conditioning,
    chunk: int,
    capture: AttentionCapture,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """The denoiser output and captured attention maps for all rows of ``x``, in calls of at most ``chunk`` rows;
    returns the chunk that fit. Running out of memory halves the chunk and redoes every call of the step."""
    while True:
        capture.clear()  # nothing from an earlier step, or from an attempt that ran out of memory
        try:
            parts = [adapter.predict(x[i : i + chunk], t, cond.rows(i, i + chunk)) for i in range(0, len(x), chunk)]
            return (parts[0] if len(parts) == 1 else torch.cat(parts)), capture.maps(), chunk
        except torch.OutOfMemoryError:
            capture.clear()
            if chunk == 1:
                raise
            chunk = (chunk + 1) // 2
            if x.is_cuda:
                torch.cuda.empty_cache()


class LatentSpace(Protocol):
    """What the starting noise depends on: a model adapter, or the facts a worker reported of one."""

    vae_scale_factor: int
    latent_channels: int
    dtype: Any
    device: Any


def initial_latents(
    adapter: LatentSpace, seeds: Sequence[int], height: int, width: int, generator_device: str = "cpu"
) -> torch.Tensor:
    """One generator per image, so an image depends only on its own seed (as diffusers does for a generator list)."""
    f = adapter.vae_scale_factor
    shape = (1, adapter.latent_channels, height // f, width // f)
    noise = [
        torch.randn(
            shape,
            generator=torch.Generator(generator_device).manual_seed(int(s)),
            device=generator_device,
            dtype=adapter.dtype,
        )
        for s in seeds
    ]
    return torch.cat(noise).to(adapter.device)


@torch.inference_mode()
def sample(
    adapter: ModelAdapter,
    guider: Guider,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    generator_device: str = "cpu",
    latents: torch.Tensor | None = None,
    decode: bool = True,
    on_step: Callable[[int, int], None] | None = None,
    max_model_batch: int | None = None,
) -> SampleResult:
    """Sample one image per (prompt, seed) pair. ``latents`` overrides the seeded initial noise (unscaled).

    ``steps`` defaults to the model's recommended count (``adapter.default_steps``: the checkpoint's, else 50); the
    guider's parameters are the caller's, so pass the model's recommended ones explicitly::

        sample(adapter, make_guider("cfg", **adapter.guidance_defaults()), prompts, seeds)

    All branches of all samples go through one denoiser call per step; ``max_model_batch`` caps the rows of one
    call, and running out of GPU memory halves the cap (the result is the same up to kernel rounding).
    """
    prompts, seeds = list(prompts), list(seeds)
    if len(prompts) != len(seeds):
        raise InputError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    steps = adapter.default_steps if steps is None else steps
    if steps < 1:
        raise InputError(f"steps must be at least 1 (got {steps})")
    height, width = height or adapter.default_size[0], width or adapter.default_size[1]
    adapter.check_size(height, width)

    branch_texts = [guider.branches(p) for p in prompts]
    n_branches = len(branch_texts[0])
    if any(len(b) != n_branches for b in branch_texts):
        raise InputError("all prompts of one batch need the same number of guidance branches; batch them apart")
    texts = [branches[k] for k in range(n_branches) for branches in branch_texts]  # branch-major
    cond = adapter.encode(texts)
    batch = len(prompts)

    if latents is None:
        latents = initial_latents(adapter, seeds, height, width, generator_device)
    latents = latents.to(adapter.device, adapter.dtype)
    scheduler = adapter.fresh_scheduler()
    scheduler.set_timesteps(steps, device=adapter.device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    latents = latents * scheduler.init_noise_sigma

    latent_size = (latents.shape[-2], latents.shape[-1])
    layers = guider.prepare(adapter.attention_layers(height, width), latent_size)
    guider.start(BatchContext(prompts=prompts, latent_size=latent_size, tokens=cond.tokens))
    timesteps = scheduler.timesteps
    # The scheduler and the guider get the timestep as a host value: indexing the scheduler's tables with a GPU
    # scalar, or reading it with float(), would make the CPU wait for the GPU at every step.
    host_timesteps = timesteps.cpu()
    chunk = max_model_batch or n_branches * batch
    with capture_attention(adapter.denoiser, layers) as capture:
        for i, (t, t_host) in enumerate(zip(timesteps, host_timesteps, strict=True)):
            model_in = scheduler.scale_model_input(torch.cat([latents] * n_branches), t_host)
            out, maps, chunk = _predict(adapter, model_in, t, cond, chunk, capture)
            guided = guider.combine(
                out.view(n_branches, batch, *out.shape[1:]), maps, StepInfo(i, len(timesteps), float(t_host))
            )
            latents = scheduler.step(guided.to(latents.dtype), t_host, latents, return_dict=False)[0]
            if on_step is not None:
                on_step(i + 1, len(timesteps))

    truncated = [any(cond.truncated[k * batch + b] for k in range(n_branches)) for b in range(batch)]
    images = adapter.decode(latents) if decode else []
    return SampleResult(images=images, latents=latents, records=guider.records(), truncated=truncated)
