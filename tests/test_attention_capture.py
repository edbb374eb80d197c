"""Attention maps are captured at exactly the requested layers, match diffusers' own attention scores, and nothing
is captured (no hooks left) when a guider asks for none."""

from __future__ import annotations

import pytest
import torch

from diffprobe.guidance import CFG
from diffprobe.models import load_model
from diffprobe.sampling import sample


class RecordingCFG(CFG):
    """CFG that requests the layers on chosen grids and keeps what it was handed."""

    def __init__(self, grids):
        super().__init__(7.5)
        self.grids = set(grids)
        self.seen: list[dict[str, torch.Tensor]] = []

    def prepare(self, layers, latent_size):
        return [layer for layer in layers if (layer.height, layer.width) in self.grids]

    def combine(self, preds, attention, step):
        self.seen.append({k: v.clone() for k, v in attention.items()})
        return super().combine(preds, attention, step)


def _reference_maps(adapter, names, run):
    """Head-averaged maps computed from each layer's inputs with diffusers' own Attention helpers."""
    modules = dict(adapter.denoiser.named_modules())
    refs, handles = {}, []

    def make_hook(name):
        def hook(attn, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            context = kwargs.get("encoder_hidden_states")
            context = hidden if context is None else context
            q = attn.head_to_batch_dim(attn.to_q(hidden))
            k = attn.head_to_batch_dim(attn.to_k(context))
            mask = kwargs.get("attention_mask")
            if mask is not None:
                mask = attn.prepare_attention_mask(mask, k.shape[1], hidden.shape[0])
            probs = attn.get_attention_scores(q, k, mask)
            refs[name] = probs.view(hidden.shape[0], attn.heads, *probs.shape[1:]).mean(1)

        return hook

    for name in names:
        handles.append(modules[name].register_forward_pre_hook(make_hook(name), with_kwargs=True))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return refs


@pytest.mark.parametrize(
    "fixture,grids,expected_counts",
    [
        # tiny SD: 16x16 latent; latent/4 = 4x4 (down_blocks.2: 1 layer, up_blocks.1: 2), latent/8 = 2x2 (mid)
        ("tiny_sd_path", [(4, 4), (2, 2)], {(4, 4): 3, (2, 2): 1}),
        # tiny SDXL: 16x16 latent; 8x8 (down 1: 1 layer, up 1: 2) and 4x4 (down 2: 1, mid: 1, up 0: 2)
        ("tiny_sdxl_path", [(8, 8), (4, 4)], {(8, 8): 3, (4, 4): 4}),
        # tiny PixArt: a single 8x8 grid (16x16 latent, patch 2), two blocks
        ("tiny_pixart_path", [(8, 8)], {(8, 8): 2}),
    ],
)
def test_maps_captured_at_requested_resolutions(request, fixture, grids, expected_counts):
    adapter = load_model(str(request.getfixturevalue(fixture)), device="cpu")
    guider = RecordingCFG(grids)
    requested = guider.prepare(adapter.attention_layers(32, 32), (16, 16))
    per_grid: dict[tuple[int, int], int] = {}
    for layer in requested:
        if layer.kind == "cross":
            per_grid[(layer.height, layer.width)] = per_grid.get((layer.height, layer.width), 0) + 1
    assert per_grid == expected_counts

    prompts, seeds = ["a red circle", "a blue square"], [0, 1]
    refs = _reference_maps(
        adapter,
        [layer.name for layer in requested],
        lambda: sample(adapter, guider, prompts, seeds, steps=1, decode=False),
    )
    maps = guider.seen[0]
    assert set(maps) == {layer.name for layer in requested}
    token_len = adapter.token_limit
    for layer in requested:
        m = maps[layer.name]
        keys = layer.height * layer.width if layer.kind == "self" else token_len
        assert m.shape == (2 * len(prompts), layer.height * layer.width, keys)  # 2 branches x batch, branch-major
        assert torch.allclose(m.sum(-1), torch.ones_like(m.sum(-1)), atol=1e-5)  # rows are distributions
        assert torch.allclose(m, refs[layer.name].float(), atol=1e-5)


def test_nothing_captured_and_no_hooks_left_without_request(tiny_sd):
    guider = RecordingCFG(grids=[])
    sample(tiny_sd, guider, ["a red circle"], [0], steps=2, decode=False)
    assert guider.seen == [{}, {}]
    assert all(not m._forward_pre_hooks for m in tiny_sd.denoiser.modules())


def test_hooks_removed_after_capture(tiny_sd):
    guider = RecordingCFG(grids=[(4, 4)])
    sample(tiny_sd, guider, ["a red circle"], [0], steps=1, decode=False)
    assert guider.seen[0]
    assert all(not m._forward_pre_hooks for m in tiny_sd.denoiser.modules())


def test_capture_does_not_change_the_result(tiny_sd):
    plain = sample(tiny_sd, CFG(7.5), ["a red circle"], [0], steps=2, decode=False).latents
    captured = sample(tiny_sd, RecordingCFG(grids=[(4, 4), (2, 2)]), ["a red circle"], [0], steps=2, decode=False)
    assert torch.equal(plain, captured.latents)


def test_layer_grids_follow_latent_size(tiny_sd):
    layers = tiny_sd.attention_layers(64, 32)  # latent 32x16
    grids = {(layer.height, layer.width) for layer in layers}
    assert grids == {(32, 16), (16, 8), (8, 4), (4, 2)}
