"""Attention capture: forward pre-hooks on exactly the requested attention modules.

A hooked module still runs its own (fused) attention; the hook recomputes softmax(QK^T * scale) from the same
inputs, averages it over heads and keeps it. Unrequested layers are never touched. One sampling step may run the
denoiser in several calls (chunks of rows); the capture keeps every call's maps and gathers them in row order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from ..models.base import AttentionLayer


def attention_probs(
    attn: torch.nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-averaged attention probabilities (batch, queries, keys) of a diffusers ``Attention`` module, in fp32."""
    if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if getattr(attn, "group_norm", None) is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    context = hidden_states
    if encoder_hidden_states is not None:
        context = encoder_hidden_states
        if getattr(attn, "norm_cross", None):
            context = attn.norm_encoder_hidden_states(context)
    batch, heads = hidden_states.shape[0], attn.heads
    q = attn.to_q(hidden_states)
    k = attn.to_k(context)
    q = q.view(batch, -1, heads, q.shape[-1] // heads).transpose(1, 2)
    k = k.view(batch, -1, heads, k.shape[-1] // heads).transpose(1, 2)
    if getattr(attn, "norm_q", None) is not None:
        q = attn.norm_q(q)
    if getattr(attn, "norm_k", None) is not None:
        k = attn.norm_k(k)
    scores = (q.float() @ k.float().transpose(-1, -2)) * attn.scale
    if attention_mask is not None:
        mask = attention_mask
        if mask.dtype == torch.bool:
            mask = torch.zeros_like(mask, dtype=torch.float32).masked_fill(~mask, float("-inf"))
        while mask.ndim < 4:  # (B, L) or (B, 1, L) -> (B, 1, 1, L)
            mask = mask.unsqueeze(1)
        scores = scores + mask.float()
    return scores.softmax(dim=-1).mean(dim=1)


class AttentionCapture:
    """The maps captured since the last ``clear()``, per layer name, one part per denoiser call."""

    def __init__(self) -> None:
        self._parts: dict[str, list[torch.Tensor]] = {}

    def add(self, name: str, probs: torch.Tensor) -> None:
        self._parts.setdefault(name, []).append(probs)

    def clear(self) -> None:
        """Forget every captured map (before a step's first call, and before a call is retried)."""
        self._parts.clear()

    def maps(self) -> dict[str, torch.Tensor]:
        """Per layer, the maps of all calls since ``clear()`` joined along the batch in call order."""
        return {name: parts[0] if len(parts) == 1 else torch.cat(parts) for name, parts in self._parts.items()}


@contextmanager
def capture_attention(model: torch.nn.Module, layers: Sequence[AttentionLayer]) -> Iterator[AttentionCapture]:
    """Within the context, every forward of ``model`` adds the head-averaged map of each requested layer."""
    capture = AttentionCapture()
    modules = dict(model.named_modules())
    handles = []
    for layer in layers:
        if layer.name not in modules:
            raise KeyError(f"no attention module named {layer.name!r} in {type(model).__name__}")

        def hook(module, args, kwargs, name=layer.name):
            hidden = args[0] if args else kwargs["hidden_states"]
            capture.add(
                name,
                attention_probs(module, hidden, kwargs.get("encoder_hidden_states"), kwargs.get("attention_mask")),
            )

        handles.append(modules[layer.name].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield capture
    finally:
        for handle in handles:
            handle.remove()
