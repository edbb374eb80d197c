"""S-CFG and concept guidance end to end through the sampler on tiny SD, SDXL, PixArt and the shapes model."""

from __future__ import annotations

import pytest
import torch

from diffprobe.guidance import CFG
from diffprobe.guidance.concept import ConceptGuidance
from diffprobe.guidance.scfg import SCFG
from diffprobe.models import load_model
from diffprobe.sampling import sample

PROMPTS = ["a red circle and a blue square", "two green triangles"]
SEEDS = [3, 4]


@pytest.fixture(scope="module")
def adapters(tiny_sd_path, tiny_sdxl_path, tiny_pixart_path, tmp_path_factory):
    out = {
        name: load_model(str(p), device="cpu")
        for name, p in (("sd", tiny_sd_path), ("sdxl", tiny_sdxl_path), ("pixart", tiny_pixart_path))
    }
    out["shapes"] = _shapes_model(tmp_path_factory)
    return out


def _shapes_model(tmp_path_factory):
    """The trained shapes model when its weights are installed, else the same architecture with random weights."""
    from diffprobe.errors import DiffprobeError

    try:
        return load_model("shapes", device="cpu")
    except (DiffprobeError, FileNotFoundError, ImportError, AttributeError):
        from diffprobe.worlds.shapes.model import build_models, save_pipeline

        folder = save_pipeline(tmp_path_factory.mktemp("models") / "shapes-random", **build_models(seed=0))
        return load_model(str(folder), device="cpu")


STEPS = 2
_CFG: dict[int, torch.Tensor] = {}


def run(adapter, guider, prompts=PROMPTS, seeds=SEEDS, steps=STEPS):
    return sample(adapter, guider, prompts, seeds, steps=steps, decode=False)


def cfg_latents(adapter) -> torch.Tensor:
    if id(adapter) not in _CFG:
        _CFG[id(adapter)] = run(adapter, CFG(scale=7.5)).latents
    return _CFG[id(adapter)]


@pytest.mark.parametrize("family", ["sd", "sdxl", "pixart", "shapes"])
def test_scfg_end_to_end(adapters, family):
    adapter = adapters[family]
    base = cfg_latents(adapter)
    off = run(adapter, SCFG(scale=7.5, use_rate=False))
    assert torch.equal(off.latents, base)  # the switch gives CFG exactly, through the whole loop

    guider = SCFG(scale=7.5)
    res = run(adapter, guider)
    assert torch.isfinite(res.latents).all() and not torch.equal(res.latents, base)
    h, w = base.shape[-2:]
    rec = res.records[0]
    assert len(res.records) == 2 and len(rec["steps"]) == STEPS
    assert all(0.8 - 1e-5 <= s["rate_min"] <= s["rate_max"] <= 2.0 + 1e-5 for s in rec["steps"])
    if family == "pixart":  # one DiT grid pooled onto latent/4; T5 has no start token -> global benchmark
        assert rec["mask_grid"] == [h // 4, w // 4] and rec["benchmark"] == "global"
    else:  # the layers at latent/4 and latent/8, chosen from the latent size
        f = adapter.vae_scale_factor
        chosen = guider.prepare(adapter.attention_layers(f * h, f * w), (h, w))
        assert {layer.height for layer in chosen} <= {h // 4, h // 8} and rec["mask_grid"] == [h // 4, w // 4]
        assert rec["benchmark"] == "foreground"


@pytest.mark.parametrize("family", ["sd", "sdxl", "pixart", "shapes"])
def test_concept_guidance_end_to_end(adapters, family):
    adapter = adapters[family]
    concepts = "a red circle; a blue square"
    guider = ConceptGuidance(concepts=concepts)
    res = run(adapter, guider)
    assert torch.isfinite(res.latents).all() and not torch.equal(res.latents, cfg_latents(adapter))
    rec = res.records[1]
    assert rec["concepts"] == ["a red circle", "a blue square"] and rec["mode"] == "v0"
    assert len(rec["steps"]) == STEPS and all(len(s["similarity"]) == 3 for s in rec["steps"])
    assert all(0.0 <= v <= 1.0 + 1e-6 for s in rec["steps"] for v in s["similarity"])
    head = run(adapter, ConceptGuidance(concepts=concepts, mode="head"))
    assert torch.isfinite(head.latents).all()


def test_concept_guidance_uses_the_extractor_and_falls_back(adapters):
    adapter = adapters["sd"]
    res = run(adapter, ConceptGuidance(), ["a green bench and a red car"], [1])
    assert res.records[0]["concepts"] == ["a green bench", "a red car"]
    with pytest.warns(UserWarning, match="plain CFG"):
        empty = run(adapter, ConceptGuidance(concepts=""), ["a green bench"], [1])
    assert torch.equal(empty.latents, run(adapter, CFG(), ["a green bench"], [1]).latents)
    assert empty.records[0]["fallback"].startswith("cfg")
