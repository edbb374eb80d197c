"""Our sampling loop with CFG gives the same latents as the diffusers pipelines from the same initial latents."""

from __future__ import annotations

import diffusers
import pytest
import torch

from diffprobe.guidance import CFG
from diffprobe.models import load_model
from diffprobe.sampling import initial_latents, sample

PROMPTS = ["a red circle", "two blue squares above a green triangle"]
SEEDS = [0, 7]
STEPS = 4


def _pipeline_latents(pipe, latents, scale, **extra):
    out = pipe(
        PROMPTS,
        num_inference_steps=STEPS,
        guidance_scale=scale,
        latents=latents.clone(),
        height=32,
        width=32,
        output_type="latent",
        **extra,
    )
    return out.images


CASES = [
    ("tiny_sd_path", "StableDiffusionPipeline", "default", 0.0, {"guidance_rescale": 0.0}),
    ("tiny_sd_path", "StableDiffusionPipeline", "dpmpp-2m", 0.7, {"guidance_rescale": 0.7}),
    ("tiny_sd_v_path", "StableDiffusionPipeline", "euler", 0.0, {}),
    ("tiny_sdxl_path", "StableDiffusionXLPipeline", "default", 0.5, {"guidance_rescale": 0.5}),
    (
        "tiny_pixart_path",
        "PixArtAlphaPipeline",
        "default",
        0.0,
        {"clean_caption": False, "use_resolution_binning": False},
    ),
    ("tiny_pixart_path", "PixArtAlphaPipeline", "ddim", 0.0, {"clean_caption": False, "use_resolution_binning": False}),
]


@pytest.mark.parametrize("fixture,pipeline,scheduler,rescale,extra", CASES)
def test_cfg_matches_diffusers_pipeline(request, fixture, pipeline, scheduler, rescale, extra):
    path = request.getfixturevalue(fixture)
    adapter = load_model(str(path), device="cpu", scheduler=scheduler)
    start = initial_latents(adapter, SEEDS, 32, 32)
    ours = sample(adapter, CFG(5.0, rescale), PROMPTS, SEEDS, steps=STEPS, height=32, width=32, decode=False).latents

    pipe = adapter.pipe  # the same components, driven by diffusers' own pipeline code
    theirs = _pipeline_latents(pipe, start, 5.0, **extra)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert theirs.abs().mean() > 0.1  # the comparison is not between two zero tensors


def test_pipeline_instance_is_diffusers_own(tiny_sd):
    assert type(tiny_sd.pipe) is diffusers.StableDiffusionPipeline


def test_image_depends_only_on_its_seed(tiny_sd):
    # The noise is bit-identical; the denoised latents agree up to float batching effects of CPU kernels.
    noise = initial_latents(tiny_sd, [1, 3, 5], 32, 32)
    assert torch.equal(noise[1:2], initial_latents(tiny_sd, [3], 32, 32))
    alone = sample(tiny_sd, CFG(7.5), ["a red circle"], [3], steps=3, decode=False).latents
    batched = sample(tiny_sd, CFG(7.5), ["a red circle"] * 3, [1, 3, 5], steps=3, decode=False).latents
    first = sample(tiny_sd, CFG(7.5), ["a red circle"] * 2, [3, 9], steps=3, decode=False).latents
    assert (alone[0] - batched[1]).abs().max() < 1e-3
    assert (alone[0] - first[0]).abs().max() < 1e-3
    assert not torch.allclose(batched[0], batched[1])


def test_decode_gives_images_of_requested_size(tiny_sd):
    result = sample(tiny_sd, CFG(7.5), ["a red circle", "a square"], [0, 1], steps=2, height=64, width=32)
    assert [im.size for im in result.images] == [(32, 64), (32, 64)]
    assert result.truncated == [False, False]


def test_long_prompt_is_reported_truncated(tiny_sd):
    long_prompt = " ".join(["circle"] * 40)  # spelled out per character: far over 77 tokens
    result = sample(tiny_sd, CFG(7.5), [long_prompt], [0], steps=1, decode=False)
    assert result.truncated == [True]


def test_split_model_calls_give_the_same_result(tiny_sd):
    prompts, seeds = ["a red circle", "a blue square", "a cat"], [0, 1, 2]
    whole = sample(tiny_sd, CFG(7.5), prompts, seeds, steps=2, decode=False).latents
    split = sample(tiny_sd, CFG(7.5), prompts, seeds, steps=2, decode=False, max_model_batch=1).latents
    assert (whole - split).abs().max() < 1e-3


def test_out_of_memory_halves_the_model_batch(tiny_sd, monkeypatch):
    calls = []
    real_predict = tiny_sd.predict

    def predict(latents, t, cond):  # a "GPU" that holds at most 2 rows
        calls.append(len(latents))
        if len(latents) > 2:
            raise torch.OutOfMemoryError("simulated")
        return real_predict(latents, t, cond)

    monkeypatch.setattr(tiny_sd, "predict", predict)
    out = sample(tiny_sd, CFG(7.5), ["a red circle", "a cat"], [0, 1], steps=2, decode=False).latents
    monkeypatch.undo()
    whole = sample(tiny_sd, CFG(7.5), ["a red circle", "a cat"], [0, 1], steps=2, decode=False).latents
    assert calls[:3] == [4, 2, 2]  # 4 rows (2 branches x 2 samples) fail once, then halves
    assert calls[3:] == [2, 2]  # the next step starts at the size that fit
    assert (out - whole).abs().max() < 1e-3
