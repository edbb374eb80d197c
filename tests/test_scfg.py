"""S-CFG arithmetic against values computed independently here (numpy loops, hand-built maps)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffprobe.errors import InputError, ResolutionError
from diffprobe.guidance import CFG, AttentionLayer, BatchContext, StepInfo, make_guider
from diffprobe.guidance.scfg import (
    SCFG,
    foreground_mask,
    propagate,
    region_masks,
    region_rates,
    token_masks,
)
from diffprobe.guidance.smoothing import gaussian_kernel_2d, gaussian_smooth

STEP = StepInfo(index=0, num_steps=1, timestep=999.0)


def np_smooth(x: np.ndarray) -> np.ndarray:
    """3x3 blur with the reference kernel exp(-((i-1)/(2*0.5))^2), reflect padding, explicit loops."""
    g = np.array([math.exp(-(((i - 1) / 1.0) ** 2)) for i in range(3)])
    k = np.outer(g, g) / np.outer(g, g).sum()
    h, w = x.shape
    p = np.pad(x, 1, mode="reflect")
    out = np.zeros_like(x, dtype=np.float64)
    for i in range(h):
        for j in range(w):
            out[i, j] = (p[i : i + 3, j : j + 3] * k).sum()
    return out


def random_stochastic(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(*shape, generator=g), dim=-1)


def test_kernel_is_the_reference_formula():
    k = gaussian_kernel_2d(3, 0.5)
    one_d = np.array([math.exp(-1.0), 1.0, math.exp(-1.0)]) / (1 + 2 * math.exp(-1.0))
    np.testing.assert_allclose(k.numpy(), np.outer(one_d, one_d), atol=1e-7)
    np.testing.assert_allclose(k.sum(0).numpy(), [0.2119, 0.5761, 0.2119], atol=1e-4)
    x = torch.randn(5, 7, dtype=torch.float64)
    np.testing.assert_allclose(gaussian_smooth(x.float()).numpy(), np_smooth(x.numpy()), atol=1e-6)


def test_propagation_code_and_paper_against_matrix_powers():
    s = random_stochastic(3, 16, 16)
    c = random_stochastic(3, 16, 6, seed=1)
    s2 = s @ s
    code = ((s + 3 * s2) / 4) @ c
    paper = ((s + s2 + s2 @ s + s2 @ s2) / 4) @ c
    torch.testing.assert_close(propagate(s, c, 4, "code"), code, atol=1e-6, rtol=0)
    torch.testing.assert_close(propagate(s, c, 4, "paper"), paper, atol=1e-6, rtol=0)
    # Both stay row-stochastic over tokens; on these maps they differ measurably (spec P1).
    torch.testing.assert_close(propagate(s, c, 4, "code").sum(-1), torch.ones(3, 16))
    gap = (propagate(s, c, 4, "code") - propagate(s, c, 4, "paper")).abs().max().item()
    assert gap > 1e-3


def np_token_masks(self_maps, cross_maps, grid, mask_grid):
    """Independent implementation of spec steps 2.2-2.8 for one resolution at the mask grid."""
    layers, n, hw, t = cross_maps.shape
    tok = np.zeros((n, t, *mask_grid))
    fore = np.zeros((n, 2, *mask_grid))
    for layer in range(layers):
        for b in range(n):
            s = self_maps[layer, b].astype(np.float64)
            prop = (s + 3 * s @ s) / 4 @ cross_maps[layer, b]
            maps = [np_smooth(prop[:, i].reshape(grid)) for i in range(t)]
            for i in range(t):
                tok[b, i] += maps[i] / (maps[i].mean() + 1e-8)
            rest = sum(maps[1:])
            fore[b, 0] += maps[0] / maps[0].mean()
            fore[b, 1] += rest / rest.mean()
    return tok / layers, fore / layers


def test_token_masks_on_hand_built_maps():
    grid = (4, 4)
    s = random_stochastic(2, 2, 16, 16)  # 2 layers, batch of 2 (uncond, cond)
    c = random_stochastic(2, 2, 16, 5, seed=3)
    tok, fore = token_masks([(s, c, grid)], grid)
    ref_tok, ref_fore = np_token_masks(s.numpy(), c.numpy(), grid, grid)
    np.testing.assert_allclose(tok.numpy(), ref_tok, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fore.numpy(), ref_fore, rtol=1e-5, atol=1e-6)


def test_coarse_resolution_is_upsampled_bilinearly_before_smoothing():
    s = torch.eye(4).expand(1, 1, 4, 4).contiguous()  # identity self-attention: no propagation
    c = torch.zeros(1, 1, 4, 3)
    c[0, 0, :, 0] = torch.tensor([0.7, 0.2, 0.1, 0.4])
    c[0, 0, :, 1] = 1 - c[0, 0, :, 0]
    tok, _ = token_masks([(s, c, (2, 2))], (4, 4))
    # bilinear x2 (align_corners=False) of a 2x2 map, computed by hand: weights 3/4, 1/4 and clamped edges
    a = c[0, 0, :, 0].reshape(2, 2).numpy().astype(np.float64)
    idx = [(0, 0, 1.0), (0, 1, 0.75), (0, 1, 0.25), (1, 1, 1.0)]  # (lo, hi, weight of lo) per output row
    up = np.zeros((4, 4))
    for i, (i0, i1, wi) in enumerate(idx):
        for j, (j0, j1, wj) in enumerate(idx):
            up[i, j] = (
                wi * wj * a[i0, j0]
                + wi * (1 - wj) * a[i0, j1]
                + (1 - wi) * wj * a[i1, j0]
                + (1 - wi) * (1 - wj) * a[i1, j1]
            )
    sm = np_smooth(up)
    np.testing.assert_allclose(tok[0, 0].numpy(), sm / (sm.mean() + 1e-8), rtol=1e-5)


def test_region_and_foreground_masks_with_ties():
    tokens = torch.tensor([[[[1.0, 2.0]], [[3.0, 1.0]], [[0.0, 1.5]]]])  # (B=1, T=3, 1, 2)
    code = region_masks(tokens, "code")
    assert code[0, :, 0, 0].tolist() == [0, 1, 0]
    assert code[0, :, 0, 1].tolist() == [1, 0, 0]
    tied = torch.tensor([[[[2.0]], [[2.0]], [[1.0]]]])
    assert region_masks(tied, "code")[0, :, 0, 0].tolist() == [1, 1, 0]  # both tied tokens marked
    assert region_masks(tied, "argmax")[0, :, 0, 0].tolist() == [1, 0, 0]  # first one only
    fore = torch.tensor([[[[1.0, 2.0, 3.0]], [[2.0, 2.0, 1.0]]]])  # SOS vs rest
    assert foreground_mask(fore)[0, 0, 0].tolist() == [1.0, 0.0, 0.0]  # tie -> background


def test_region_rates_against_hand_computation():
    # 8x8 latent, 2x2 mask grid (R = 4): token 0 owns the top-left cell, token 1 the anti-diagonal, token 2
    # the bottom-right; the foreground is everything but the top-left cell.
    masks = torch.zeros(1, 3, 2, 2)
    masks[0, 0, 0, 0] = masks[0, 1, 0, 1] = masks[0, 1, 1, 0] = masks[0, 2, 1, 1] = 1
    fore = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])
    cell_norm = np.array([[1.0, 2.0], [4.0, 6.0]])
    delta = torch.zeros(1, 4, 8, 8)
    for i in range(2):
        for j in range(2):  # put the whole norm into channel 2 of every pixel of the cell
            delta[0, 2, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4] = cell_norm[i, j]
    n_fg = (2 + 4 + 6) / 3
    rho = [n_fg / 1.0, n_fg / 3.0, n_fg / 6.0]  # token 1's mean norm: (2 + 4) / 2
    cell_rate = np.array([[rho[0], rho[1]], [rho[1], rho[2]]])
    scale = 7.5
    cell_rate = np.minimum(np.clip(cell_rate, 0.8, 3.0), 15 / scale)
    expected = np_smooth(np.kron(cell_rate, np.ones((4, 4))))
    rate = region_rates(delta, masks, fore, scale=scale)
    np.testing.assert_allclose(rate[0, 0].numpy(), expected, rtol=1e-5)
    # the global benchmark (IF stage I) uses the image-wide mean norm
    rho_g = [13 / 4 / 1.0, 13 / 4 / 3.0, 13 / 4 / 6.0]
    cell_g = np.minimum(np.clip(np.array([[rho_g[0], rho_g[1]], [rho_g[1], rho_g[2]]]), 0.8, 3.0), 2.0)
    np.testing.assert_allclose(
        region_rates(delta, masks, None, scale=scale)[0, 0].numpy(),
        np_smooth(np.kron(cell_g, np.ones((4, 4)))),
        rtol=1e-5,
    )


def test_tied_pixels_sum_their_rates():
    masks = torch.ones(1, 2, 1, 1)  # one cell owned by two tokens
    fore = torch.ones(1, 1, 1, 1)
    delta = torch.ones(1, 4, 4, 4)
    rate = region_rates(delta, masks, fore, scale=1.0, clamp=(0.0, 10.0), max_scale=100.0)
    torch.testing.assert_close(rate, torch.full((1, 1, 4, 4), 2.0))  # 1 + 1, smoothing keeps a constant


# ---------------------------------------------------------------------------------------------
# The guider: layer choice from the latent size, full combine, CFG parity, batches


def sd15_layers(latent: int = 64) -> list[AttentionLayer]:
    """The attention layout of SD 1.5's UNet: 2 transformer blocks per down level, 3 per up level, 1 mid."""
    out = []
    plan = [("down_blocks", i, 2, latent >> i) for i in range(3)] + [
        ("up_blocks", i, 3, latent >> (3 - i)) for i in (1, 2, 3)
    ]
    plan.append(("mid_block", None, 1, latent >> 3))
    for block, i, n, g in plan:
        for a in range(n):
            prefix = f"{block}.{i}.attentions.{a}" if i is not None else f"{block}.attentions.{a}"
            for kind, attn in (("self", "attn1"), ("cross", "attn2")):
                out.append(AttentionLayer(f"{prefix}.transformer_blocks.0.{attn}", kind, g, g))
    return out


def test_sd15_layers_at_16_and_8_from_the_latent_size():
    g = SCFG()
    chosen = g.prepare(sd15_layers(64), (64, 64))
    grids = sorted({(layer.height, layer.kind) for layer in chosen})
    assert grids == [(8, "cross"), (8, "self"), (16, "cross"), (16, "self")]
    assert len(chosen) == 12  # 5 + 1 self/cross pairs
    # 768 px SD 2.1: 96 latent -> 24 and 12
    assert {layer.height for layer in SCFG().prepare(sd15_layers(96), (96, 96))} == {24, 12}
    with pytest.raises(ResolutionError):
        SCFG().prepare(sd15_layers(60), (60, 60))
    with pytest.raises(ResolutionError, match="resolution_factor"):
        SCFG(resolution_factor=16).prepare(sd15_layers(64), (64, 64))
    assert SCFG(use_rate=False).prepare(sd15_layers(64), (64, 64)) == []


def fake_attention(layers, batch, tokens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers:
        n = layer.height * layer.width
        keys = n if layer.kind == "self" else tokens
        out[layer.name] = torch.softmax(4 * torch.randn(2 * batch, n, keys, generator=gen), -1)
    return out


def test_combine_matches_composition_and_reduces_to_cfg():
    layers = sd15_layers(32)
    g = SCFG(scale=5.0)
    chosen = g.prepare(layers, (32, 32))
    g.start(BatchContext(prompts=["a b"], latent_size=(32, 32)))
    att = fake_attention(chosen, 1, 7)
    preds = torch.randn(2, 1, 4, 32, 32, generator=torch.Generator().manual_seed(5))
    out = g.combine(preds, att, STEP)
    # compose the pieces by hand: 5 layers at 8x8, 1 at 4x4
    res = []
    for grid in (8, 4):
        names = [layer.name for layer in chosen if layer.height == grid]
        s = torch.stack([att[n] for n in names if n.endswith("attn1")])
        c = torch.stack([att[n] for n in names if n.endswith("attn2")])
        res.append((s, c, (grid, grid)))
    tok, fore = token_masks(res, (8, 8))
    rate = region_rates(preds[1, :] - preds[0, :], region_masks(tok[1:]), foreground_mask(fore[:1]), scale=5.0)
    torch.testing.assert_close(out, preds[0] + 5.0 * rate * (preds[1] - preds[0]))
    assert 0.8 - 1e-6 <= rate.min() and rate.max() <= 3.0 + 1e-6
    rec = g.records()[0]
    assert rec["benchmark"] == "foreground" and len(rec["steps"]) == 1 and rec["layers"] == 6

    # rate switched off: bit-identical to CFG; rate clamped to 1: CFG up to float rounding of the blur
    cfg = CFG(scale=5.0).combine(preds, {}, STEP)
    off = SCFG(scale=5.0, use_rate=False)
    assert torch.equal(off.combine(preds, {}, STEP), cfg)
    one = SCFG(scale=5.0, rate_min=1.0, rate_max=1.0)
    one.prepare(layers, (32, 32))
    one.start(BatchContext(prompts=["a b"], latent_size=(32, 32)))
    torch.testing.assert_close(one.combine(preds, att, STEP), cfg, atol=1e-5, rtol=1e-6)


def test_foreground_source_and_batch_independence():
    layers = sd15_layers(32)
    preds = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    guiders = {}
    for source in ("uncond", "cond"):
        g = SCFG(foreground_source=source)
        chosen = g.prepare(layers, (32, 32))
        g.start(BatchContext(prompts=["x"] * 3, latent_size=(32, 32)))
        guiders[source] = g
    att = fake_attention(chosen, 3, 9, seed=4)
    ca_u, fore_u = guiders["uncond"].masks(att, 2)
    ca_c, fore_c = guiders["cond"].masks(att, 2)
    assert torch.equal(ca_u, ca_c) and not torch.equal(fore_u, fore_c)
    batched = guiders["uncond"].combine(preds, att, STEP)
    for b in range(3):  # sample b alone gives the same result: statistics are per sample
        single = {k: v.reshape(2, 3, *v.shape[1:])[:, b] for k, v in att.items()}
        g = SCFG()
        g.prepare(layers, (32, 32))
        g.start(BatchContext(prompts=["x"], latent_size=(32, 32)))
        torch.testing.assert_close(g.combine(preds[:, b : b + 1], single, STEP)[0], batched[b], atol=1e-6, rtol=1e-5)


def test_single_grid_dit_pools_onto_latent_over_r():
    layers = [
        AttentionLayer(f"transformer_blocks.{i}.{a}", kind, 16, 16)
        for i in range(2)
        for a, kind in (("attn1", "self"), ("attn2", "cross"))
    ]
    g = SCFG()
    assert len(g.prepare(layers, (32, 32))) == 4
    g.start(BatchContext(prompts=["p"], latent_size=(32, 32), tokens=[["a", "b"], ["c", "d"]]))
    att = fake_attention(layers, 1, 6)
    ca, fore = g.masks(att, 2)
    assert ca.shape == (1, 6, 8, 8) and fore.shape == (1, 1, 8, 8)
    # pooled self maps stay row-stochastic and equal block averages computed with loops
    from diffprobe.guidance.scfg import _pool_self

    s = att["transformer_blocks.0.attn1"][:1]
    pooled = _pool_self(s, (16, 16), 2)
    torch.testing.assert_close(pooled.sum(-1), torch.ones(1, 64))
    sv = s[0].reshape(16, 16, 16, 16)
    q, k = (1, 2), (3, 0)
    ref = sv[2 * q[0] : 2 * q[0] + 2, 2 * q[1] : 2 * q[1] + 2, 2 * k[0] : 2 * k[0] + 2, 2 * k[1] : 2 * k[1] + 2]
    ref = ref.sum(dim=(2, 3)).mean()
    torch.testing.assert_close(pooled[0, q[0] * 8 + q[1], k[0] * 8 + k[1]], ref)
    preds = torch.randn(2, 1, 4, 32, 32)
    assert g.combine(preds, att, STEP).shape == (1, 4, 32, 32)
    assert g.records()[0]["benchmark"] == "global"  # T5-style tokens: no start token


def test_bad_options_are_input_errors():
    with pytest.raises(InputError):
        make_guider("scfg", propagation="exact")
    with pytest.raises(InputError):
        make_guider("scfg", foreground_source="both")
    with pytest.raises(InputError):
        make_guider("scfg", nonsense=1)
    g = make_guider("scfg", scale="5", use_rate="false")
    assert g.config()["scale"] == 5.0 and g.config()["use_rate"] is False
