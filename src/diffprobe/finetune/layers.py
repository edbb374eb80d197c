"""Which projections of the denoiser's attention fine-tuning trains.

The default is the official code's (``--trainable_layer d1d2mu1u2 --trainable_attn attn1+attn2
--trainable_module qk``): ``to_q`` and ``to_k`` of self- and cross-attention (``attn1``, ``attn2``) in
``down_blocks.1``, ``down_blocks.2``, ``mid_block``, ``up_blocks.1`` and ``up_blocks.2``. It is applied by block
name to every UNet (SD 1.x/2.x, SDXL, the shapes model); a named block without attention (SDXL's ``up_blocks.2``)
contributes nothing. For PixArt-alpha, a DiT without down/up blocks, the default is ours: the same projections in
every ``transformer_blocks.N``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import InputError

UNET_DEFAULT_BLOCKS = ("down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.1", "up_blocks.2")
ATTENTIONS = ("attn1", "attn2")  # self-attention, cross-attention
PROJECTIONS = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}
DEFAULT_PROJECTIONS = ("q", "k")

_BLOCK = re.compile(r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block|transformer_blocks\.\d+)\.")
_SHORT = re.compile(r"d(\d+)|u(\d+)|m")


@dataclass(frozen=True)
class Selection:
    """The blocks, attention kinds and projections chosen, and the Linear modules they name."""

    blocks: tuple[str, ...]
    attentions: tuple[str, ...]
    projections: tuple[str, ...]
    modules: tuple[str, ...]  # module paths inside the denoiser, e.g. "mid_block.attentions.0....attn1.to_q"

    def record(self) -> dict:
        return {"blocks": list(self.blocks), "attentions": list(self.attentions),
                "projections": list(self.projections), "modules": len(self.modules)}


def attention_blocks(denoiser: torch.nn.Module) -> dict[str, list[str]]:
    """Block name -> the attention modules (``...attn1``, ``...attn2``) inside it, in module order."""
    from diffusers.models.attention_processor import Attention

    blocks: dict[str, list[str]] = {}
    for name, module in denoiser.named_modules():
        if isinstance(module, Attention) and name.rsplit(".", 1)[-1] in ATTENTIONS:
            m = _BLOCK.match(name)
            if m:
                blocks.setdefault(m.group(1), []).append(name)
    return blocks


def default_blocks(denoiser: torch.nn.Module) -> tuple[str, ...]:
    available = attention_blocks(denoiser)
    if any(b.startswith("transformer_blocks.") for b in available):
        return tuple(available)
    return UNET_DEFAULT_BLOCKS


def parse_blocks(text: str, available: Sequence[str]) -> tuple[str, ...]:
    """``d1d2mu1u2`` (the official code's spelling), ``down_blocks.1,mid_block``, ``0,3`` (PixArt block numbers),
    or ``all``."""
    text = text.strip()
    if text == "all":
        return tuple(available)
    if _SHORT.sub("", text) == "" and text:
        return tuple(f"down_blocks.{d}" if d else f"up_blocks.{u}" if u else "mid_block"
                     for d, u in _SHORT.findall(text))
    out = []
    for part in (p.strip() for p in text.split(",")):
        if part.isdigit():
            part = f"transformer_blocks.{part}"
        out.append(part)
    return tuple(out)


def _parse_list(text: str | Sequence[str], allowed: Sequence[str], what: str, example: str) -> tuple[str, ...]:
    items = [x.strip() for x in (text.replace("+", ",").split(",") if isinstance(text, str) else text)]
    items = [x for x in items if x]
    if bad := [x for x in items if x not in allowed]:
        raise InputError(f"unknown {what} {', '.join(map(repr, bad))}; choose from {', '.join(allowed)} "
                         f"(e.g. {example})")
    if not items:
        raise InputError(f"no {what} given; choose from {', '.join(allowed)} (e.g. {example})")
    return tuple(dict.fromkeys(items))


def select(denoiser: torch.nn.Module, blocks: str | None = None, attentions: str | Sequence[str] = ATTENTIONS,
           projections: str | Sequence[str] = DEFAULT_PROJECTIONS) -> Selection:
    """The Linear modules to train; unknown names raise InputError listing what the model has."""
    available = attention_blocks(denoiser)
    names = parse_blocks(blocks, list(available)) if blocks is not None else default_blocks(denoiser)
    attn = _parse_list(attentions, ATTENTIONS, "attention", "attn1,attn2")
    proj = _parse_list(projections, list(PROJECTIONS), "projection", "q,k")
    listing = ", ".join(available) or "none"
    if unknown := [b for b in names if b not in available and not _is_block_name(b, denoiser)]:
        raise InputError(f"unknown layer(s) {', '.join(map(repr, unknown))} in --layers; this model's blocks with "
                         f"attention are: {listing} (short forms: d1d2mu1u2, or all)")
    modules = []
    for block in names:
        for attention in available.get(block, []):
            if attention.rsplit(".", 1)[-1] in attn:
                modules.extend(f"{attention}.{PROJECTIONS[p]}" for p in proj)
    if not modules:
        raise InputError(f"--layers {blocks or ','.join(names)} selects no attention projection of this model; "
                         f"its blocks with attention are: {listing}")
    return Selection(tuple(names), attn, proj, tuple(modules))


def _is_block_name(block: str, denoiser: torch.nn.Module) -> bool:
    """A block of the model that holds no attention (e.g. SDXL's up_blocks.2): allowed, selects nothing."""
    try:
        denoiser.get_submodule(block)
    except AttributeError:
        return False
    return True


def mark_trainable(denoiser: torch.nn.Module, selection: Selection) -> int:
    """Freeze the denoiser except the selected Linear modules (weight and bias); returns the trained parameters."""
    denoiser.requires_grad_(False)
    for name in selection.modules:
        denoiser.get_submodule(name).requires_grad_(True)
    return sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
