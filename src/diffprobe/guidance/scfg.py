"""S-CFG: semantic-aware classifier-free guidance (Shen et al., CVPR 2024).

CFG applies one scale to every latent pixel. S-CFG splits the latent into semantic regions, one per text
token, found from cross-attention maps completed by self-attention, and rescales the guidance of each
region so that its mean guidance magnitude matches the foreground's. Defaults follow the official SD code
(spec ``scfg.md`` section 2); where paper and code differ the paper's reading is a named option:

- ``propagation="code"`` uses ``(S + (n-1) S^2) / n`` as coded; ``"paper"`` uses ``(S + S^2 + ... + S^n) / n``.
- ``foreground_source="uncond"`` takes the foreground mask from the unconditional half as coded; ``"cond"``
  from the conditional half.
- ``ties="code"`` marks every token tied for the maximum (their rates add up); ``"argmax"`` keeps the first.
- ``benchmark="foreground"`` compares regions with the foreground (not-[SOS]) region; ``"global"`` with the
  whole image (the DeepFloyd IF stage-I rule); ``"auto"`` picks global when the text encoder has no start
  token (T5: PixArt), foreground otherwise.

Attention resolutions come from the latent size: a UNet's layers at latent/R and latent/(2R) (R = 4:
16x16 and 8x8 for SD 1.5 at 512 px, 32x32 for SDXL at 1024 px, which has no attention at latent/8).
A DiT (PixArt) has a single grid, latent/patch. There all its self- and cross-attention layers form one
resolution and their maps are average-pooled onto the latent/R grid (self-attention: mean over query
blocks, sum over key blocks, so rows stay stochastic) before propagation; the masks then have the same
latent/R resolution as on SD. This mapping is our own; the paper covers UNets only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from ..errors import InputError, ResolutionError
from .base import AttentionLayer, BatchContext, FiniteFloat, Guider, GuiderParams, StepInfo
from .cfg import rescale_guidance
from .smoothing import gaussian_smooth

_START_TOKENS = {"<|startoftext|>", "<s>", "[CLS]", "<bos>", "<start_of_text>"}


@dataclass(frozen=True)
class _Resolution:
    """The captured layers of one attention grid and how their maps reach the mask grid."""

    grid: tuple[int, int]
    self_layers: tuple[str, ...]
    cross_layers: tuple[str, ...]
    pool: int  # average-pool factor onto the mask grid (DiT); 1 for UNet grids


def propagate(self_maps: torch.Tensor, cross_maps: torch.Tensor, order: int = 4, mode: str = "code") -> torch.Tensor:
    """Complete cross-attention maps (..., N, T) with self-attention maps (..., N, N).

    ``code``: ``((S + (order-1) S@S) / order) @ C``, what the official loop computes;
    ``paper``: ``((S + S^2 + ... + S^order) / order) @ C``. Both are evaluated as repeated S@(.)C products,
    O(N^2 T) rather than O(N^3).
    """
    sc = self_maps @ cross_maps
    if order == 1:
        return sc
    if mode == "code":
        return (sc + (order - 1) * (self_maps @ sc)) / order
    total, power = sc, sc
    for _ in range(order - 1):
        power = self_maps @ power
        total = total + power
    return total / order


def _pool_self(maps: torch.Tensor, grid: tuple[int, int], f: int) -> torch.Tensor:
    """(..., hw, hw) -> (..., hw/f^2, hw/f^2): mean over f x f query blocks, sum over f x f key blocks."""
    h, w = grid
    lead = maps.shape[:-2]
    x = maps.reshape(-1, h // f, f, w // f, f, h // f, f, w // f, f)
    x = x.mean(dim=(2, 4)).sum(dim=(4, 6))
    n = (h // f) * (w // f)
    return x.reshape(*lead, n, n)


def _pool_queries(maps: torch.Tensor, grid: tuple[int, int], f: int) -> torch.Tensor:
    """(..., hw, T) -> (..., hw/f^2, T): mean over f x f query blocks."""
    h, w = grid
    lead, t = maps.shape[:-2], maps.shape[-1]
    x = maps.reshape(-1, h // f, f, w // f, f, t).mean(dim=(2, 4))
    return x.reshape(*lead, (h // f) * (w // f), t)


def token_masks(
    resolutions: Sequence[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]],
    mask_grid: tuple[int, int],
    *,
    order: int = 4,
    propagation: str = "code",
    smoothing: tuple[int, float] = (3, 0.5),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer-averaged, spatially renormalised token maps and foreground maps (spec steps 2.1 to 2.8).

    ``resolutions``: per attention grid, stacked self maps (L, N, hw, hw), cross maps (L, N, hw, T) and
    the grid (h, w); N is the flattened model batch. Returns token maps (N, T, *mask_grid) and the pair
    [SOS map, all other tokens] (N, 2, *mask_grid), both averaged over all layers.
    """
    token_sum: torch.Tensor | float = 0.0
    fore_sum: torch.Tensor | float = 0.0
    layers = 0
    for self_maps, cross_maps, (h, w) in resolutions:
        n_layers, n, _, t = cross_maps.shape
        maps = propagate(self_maps, cross_maps, order, propagation)  # (L, N, hw, T)
        maps = maps.transpose(-1, -2).reshape(n_layers * n, t, h, w)
        if (h, w) != tuple(mask_grid):
            maps = F.interpolate(maps, size=tuple(mask_grid), mode="bilinear")
        maps = gaussian_smooth(maps.float(), *smoothing)
        normed = maps / (maps.mean(dim=(-2, -1), keepdim=True) + 1e-8)
        token_sum = token_sum + normed.reshape(n_layers, n, t, *mask_grid).sum(0)
        fore = torch.stack([maps[:, 0], maps[:, 1:].sum(1)], dim=1)
        fore = fore / fore.mean(dim=(-2, -1), keepdim=True)
        fore_sum = fore_sum + fore.reshape(n_layers, n, 2, *mask_grid).sum(0)
        layers += n_layers
    if not layers:
        raise InputError("S-CFG received no attention maps; the sampler must capture the layers it asked for")
    return token_sum / layers, fore_sum / layers


def region_masks(tokens: torch.Tensor, ties: str = "code") -> torch.Tensor:
    """Hard assignment of every pixel to its strongest token: (B, T, h, w) -> {0,1} masks of the same shape."""
    if ties == "code":
        return (tokens == tokens.max(dim=1, keepdim=True).values).float()
    return F.one_hot(tokens.argmax(dim=1), tokens.shape[1]).permute(0, 3, 1, 2).float()


def foreground_mask(fore: torch.Tensor) -> torch.Tensor:
    """(B, 2, h, w) [SOS, rest] -> (B, 1, h, w): 1 where the non-SOS mass wins; ties go to the background."""
    return 1.0 - (fore[:, :1] == fore.max(dim=1, keepdim=True).values).float()


def region_rates(
    delta: torch.Tensor,
    masks: torch.Tensor,
    benchmark: torch.Tensor | None,
    *,
    scale: float,
    clamp: tuple[float, float] = (0.8, 3.0),
    max_scale: float = 15.0,
    smoothing: tuple[int, float] = (3, 0.5),
) -> torch.Tensor:
    """Per-pixel rate map (B, 1, H, W) from the guidance ``delta`` = cond - uncond (B, C, H, W) (steps 5 to 11).

    ``masks`` (B, T, h, w) and ``benchmark`` (B, 1, h, w) are nearest-upsampled to the latent grid;
    ``benchmark=None`` uses the whole image as benchmark region. When the latent is a whole multiple of the
    mask grid, the region sums are taken per mask cell instead (the same sums, without upsampling T maps).
    """
    size = tuple(delta.shape[-2:])
    norm = delta.float().norm(dim=1, keepdim=True)  # per-pixel L2 over channels
    fh, fw = size[0] // masks.shape[-2], size[1] // masks.shape[-1]
    if (fh * masks.shape[-2], fw * masks.shape[-1]) == size:
        cell, unit = F.avg_pool2d(norm, (fh, fw)) * (fh * fw), fh * fw  # sum of the norms in each cell
    else:
        masks = F.interpolate(masks, size=size, mode="nearest")
        if benchmark is not None:
            benchmark = F.interpolate(benchmark, size=size, mode="nearest")
        cell, unit = norm, 1
    area = masks.sum(dim=(2, 3)) * unit
    region = torch.einsum("bthw,bhw->bt", masks, cell[:, 0]) / (area + 1e-8)  # (B, T) mean norm per region
    if benchmark is None:
        bench = norm.mean(dim=(1, 2, 3))[:, None]
    else:
        bench = (cell * benchmark).sum(dim=(2, 3)) / (benchmark.sum(dim=(2, 3)) * unit + 1e-8)  # (B, 1)
    rho = bench * (area > 0).float() / (region + 1e-8)
    rate = torch.einsum("bt,bthw->bhw", rho, masks)[:, None]
    rate = rate.clamp(clamp[0], clamp[1]).clamp_max(max_scale / scale)
    if rate.shape[-2:] != size:
        rate = F.interpolate(rate, size=size, mode="nearest")
    return gaussian_smooth(rate, *smoothing)


class SCFGParams(GuiderParams):
    """S-CFG's parameters; the defaults reproduce the official SD code (module doc for the options)."""

    scale: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 7.5
    rescale: FiniteFloat = 0.0
    use_rate: bool = True  # False: plain CFG (the switch of the reference code)
    propagation: Literal["code", "paper"] = "code"
    propagation_order: Annotated[int, Field(ge=1)] = 4
    foreground_source: Literal["uncond", "cond"] = "uncond"
    ties: Literal["code", "argmax"] = "code"
    benchmark: Literal["auto", "foreground", "global"] = "auto"
    resolution_factor: Annotated[int, Field(ge=1)] = 4
    rate_min: FiniteFloat = 0.8
    rate_max: FiniteFloat = 3.0
    max_scale: FiniteFloat = 15.0
    smoothing_size: Annotated[int, Field(ge=1)] = 3
    smoothing_sigma: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 0.5

    @model_validator(mode="after")
    def _rates_ordered(self) -> SCFGParams:
        if self.rate_min > self.rate_max:
            raise ValueError(f"rate_min {self.rate_min} is above rate_max {self.rate_max}")
        return self

    @property
    def smoothing(self) -> tuple[int, float]:
        return self.smoothing_size, self.smoothing_sigma


@dataclass(frozen=True)
class SCFGPlan:
    """Which captured maps S-CFG reads, per attention grid, and the grid its masks live on."""

    resolutions: tuple[_Resolution, ...]
    mask_grid: tuple[int, int]

    @property
    def layer_names(self) -> set[str]:
        return {n for r in self.resolutions for n in (*r.self_layers, *r.cross_layers)}


class SCFG(Guider):
    """S-CFG guider: ``SCFG(scale=7.5)`` reproduces the official SD code; see the module doc for options."""

    name = "scfg"
    Params = SCFGParams
    params: SCFGParams

    def __init__(self, *args: Any, **params: Any):
        super().__init__(*args, **params)
        self.plan: SCFGPlan | None = None
        self._stats: list[torch.Tensor] = []  # per step: (B, 5) statistics
        self._use_global = False

    # -- which maps -------------------------------------------------------------------------------
    def prepare(self, layers: Sequence[AttentionLayer], latent_size: tuple[int, int]) -> list[AttentionLayer]:
        """Choose the attention grids for this latent size (module doc) and keep the plan; returns their layers."""
        self.plan = None
        if not self.params.use_rate:
            return []
        hl, wl = latent_size
        r = self.params.resolution_factor
        grids = {(layer.height, layer.width) for layer in layers if layer.kind == "cross"}
        if not grids:
            raise InputError("S-CFG needs cross-attention layers; this denoiser has none")
        if len(grids) == 1 and len({(layer.height, layer.width) for layer in layers}) == 1:
            plan = self._dit_plan(layers, next(iter(grids)), latent_size)
        else:
            if hl % (2 * r) or wl % (2 * r):
                raise ResolutionError(
                    f"S-CFG needs a latent size divisible by {2 * r} (got {hl}x{wl}); "
                    f"choose a height and width that are multiples of {2 * r} latent cells"
                )
            wanted = [(hl // r, wl // r), (hl // (2 * r), wl // (2 * r))]
            resolutions = tuple(p for g in wanted if (p := _resolution(layers, g, 1)) is not None)
            if not resolutions:
                raise ResolutionError(
                    f"S-CFG uses attention at latent/{r} and latent/{2 * r} ({wanted[0]} and {wanted[1]} for a "
                    f"{hl}x{wl} latent) but this model attends at {sorted(grids)}; "
                    "set resolution_factor so that latent/resolution_factor is one of those grids"
                )
            plan = SCFGPlan(resolutions, wanted[0])
        self.plan = plan
        chosen = plan.layer_names
        return [layer for layer in layers if layer.name in chosen]

    def _dit_plan(
        self, layers: Sequence[AttentionLayer], grid: tuple[int, int], latent_size: tuple[int, int]
    ) -> SCFGPlan:
        r = self.params.resolution_factor
        target = (latent_size[0] // r, latent_size[1] // r)
        f = grid[0] // target[0] if target[0] else 0
        if f >= 1 and grid == (target[0] * f, target[1] * f):
            mask_grid = target
        else:  # the single grid is already coarser than latent/R: use it as is
            f, mask_grid = 1, grid
        res = _resolution(layers, grid, f)
        if res is None:
            raise InputError(f"S-CFG needs both self- and cross-attention at the {grid} grid of this model")
        return SCFGPlan((res,), mask_grid)

    # -- guidance ---------------------------------------------------------------------------------
    def start(self, context: BatchContext) -> None:
        super().start(context)
        self._stats = []
        benchmark = self.params.benchmark
        self._use_global = benchmark == "global" or (benchmark == "auto" and not _has_start_token(context))

    def masks(self, attention: dict[str, torch.Tensor], branches: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-region masks (B, T, h, w) from the cond half, foreground mask (B, 1, h, w) from the chosen half."""
        if self.plan is None:
            raise RuntimeError("S-CFG has no plan: call prepare(layers, latent_size) before combine()")
        p = self.params
        stacked = []
        for res in self.plan.resolutions:
            missing = [n for n in (*res.self_layers, *res.cross_layers) if n not in attention]
            if missing:
                raise InputError(f"S-CFG: attention maps missing for {missing[:3]}")
            s = torch.stack([attention[n].float() for n in res.self_layers])
            c = torch.stack([attention[n].float() for n in res.cross_layers])
            grid = res.grid
            if res.pool > 1:
                s, c = _pool_self(s, grid, res.pool), _pool_queries(c, grid, res.pool)
                grid = (grid[0] // res.pool, grid[1] // res.pool)
            stacked.append((s, c, grid))
        tokens, fore = token_masks(
            stacked,
            self.plan.mask_grid,
            order=p.propagation_order,
            propagation=p.propagation,
            smoothing=p.smoothing,
        )
        tokens = tokens.reshape(branches, -1, *tokens.shape[1:])
        fore = fore.reshape(branches, -1, *fore.shape[1:])
        fore_half = fore[0] if p.foreground_source == "uncond" else fore[1]
        return region_masks(tokens[1], p.ties), foreground_mask(fore_half)

    def combine(self, preds: torch.Tensor, attention: dict[str, torch.Tensor], step: StepInfo) -> torch.Tensor:
        p = self.params
        uncond, cond = preds[0], preds[1]
        if p.use_rate:
            ca_mask, fore = self.masks(attention, preds.shape[0])
            rate = region_rates(
                cond - uncond,
                ca_mask,
                None if self._use_global else fore,
                scale=p.scale,
                clamp=(p.rate_min, p.rate_max),
                max_scale=p.max_scale,
                smoothing=p.smoothing,
            )
            self._record(rate, ca_mask, fore)
            guided = uncond + (p.scale * rate).to(preds.dtype) * (cond - uncond)
        else:
            guided = uncond + p.scale * (cond - uncond)
        if p.rescale > 0:
            guided = rescale_guidance(guided, cond, p.rescale)
        return guided

    def _record(self, rate: torch.Tensor, ca_mask: torch.Tensor, fore: torch.Tensor) -> None:
        """Per-sample step statistics, kept on the device (no host sync inside the loop) until ``records``."""
        flat = rate.flatten(1)
        stats = [flat.mean(1), flat.min(1).values, flat.max(1).values, fore.flatten(1).mean(1)]
        stats.append((ca_mask.sum(dim=(2, 3)) > 0).sum(1).float())
        self._stats.append(torch.stack(stats, dim=1))

    def records(self) -> list[dict[str, Any]]:
        benchmark = "global" if self._use_global else "foreground"
        steps = torch.stack(self._stats, dim=1).tolist() if self._stats else [[] for _ in self.context.prompts]
        keys = ("rate_mean", "rate_min", "rate_max", "foreground")
        plan = self.plan or SCFGPlan((), (0, 0))
        return [
            {
                "guidance": "scfg",
                "benchmark": benchmark,
                "mask_grid": list(plan.mask_grid),
                "layers": sum(len(r.cross_layers) for r in plan.resolutions),
                "steps": [{**dict(zip(keys, row[:4], strict=True)), "regions": int(row[4])} for row in sample_steps],
            }
            for sample_steps in steps
        ]


def _resolution(layers: Sequence[AttentionLayer], grid: tuple[int, int], pool: int) -> _Resolution | None:
    at = [layer for layer in layers if (layer.height, layer.width) == tuple(grid)]
    self_layers = tuple(layer.name for layer in at if layer.kind == "self")
    cross_layers = tuple(layer.name for layer in at if layer.kind == "cross")
    if not self_layers or not cross_layers:
        return None
    if len(self_layers) != len(cross_layers):
        # Pair each cross layer with the self layer of its transformer block (same prefix before attn1/attn2).
        by_block = {n.rsplit(".", 1)[0]: n for n in self_layers}
        pairs = [(by_block.get(c.rsplit(".", 1)[0]), c) for c in cross_layers]
        pairs = [(s, c) for s, c in pairs if s is not None]
        if not pairs:
            return None
        self_layers, cross_layers = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
    return _Resolution(tuple(grid), self_layers, cross_layers, pool)


def _has_start_token(context: BatchContext) -> bool:
    """Whether the text encoder puts a start token (CLIP's SOS) first; unknown tokens count as yes (SD)."""
    if not context.tokens or not context.tokens[0]:
        return True
    return any(t and t[0] in _START_TOKENS for t in context.tokens)
