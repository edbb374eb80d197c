"""Concept guidance (ConceptDiffusion; Kang et al., arXiv 2312.15964), spec ``concept_guidance.md``.

Every noun-phrase concept C_k of the prompt gets its own branch, so one model call predicts
``[eps(""), eps(P), eps(C_1) .. eps(C_n)]``. With the scores ``s_P = eps(P) - eps("")`` and
``s_k = eps(C_k) - eps("")`` the guider adds, to plain CFG, the parts of the concept directions that the
prompt score neglects. All statistics are per sample, over the whole flattened latent (C*H*W).

``mode="v0"`` (default) is the first official implementation (the one matching the paper's
eta = 1/(n+1), abstract concept by orthogonal projection, w_g = 7.5):

- abstract score ``s_A = s_P - proj_{sum_k s_k}(s_P)``; concept scores are scaled by ``w_c`` first;
- similarities ``rho = |cos(s_P, .)|``;
- abstract: if ``rho_A < abstract_threshold`` add ``c_A`` masked to entries with ``|c_A| >=`` the per-channel
  ``rho_A``-quantile of ``|c_A|``;
- subject k: ``p_k = c_k - proj_{s_P}(c_k)``; add it if ``rho_k < eta`` (eta = 1/(n+1) for ``"auto"``),
  subtract it if ``rho_k > upper_bound``;
- ``eps = eps("") + w_g s_P + g``.

``mode="head"`` is the later repository variant: top-10 % masks per channel, sequential rejection,
momentum, thresholds on a window of past similarities, ``eps = eps("") + w_g s_P + w_c sum h``.
With no concepts (n = 0) the guider is plain CFG and says so (warning and record).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InputError
from .base import BatchContext, Guider, StepInfo
from .cfg import rescale_guidance
from .concepts import Extractor, get_extractor, parse_concepts

_MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    # configs/default.yaml of the first release; cool-down 50 of 50 steps = active at every step
    "v0": {"concept_scale": 7.5, "subject_threshold": "auto", "abstract_threshold": 0.7, "warm_up": 0},
    # configs/models/ours.yaml of the later release
    "head": {"concept_scale": 8.5, "subject_threshold": 0.5, "abstract_threshold": 0.5, "warm_up": 5},
}


def reject(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x - proj_y(x)`` row-wise over the last dim; rows where ``y`` is zero are returned unchanged."""
    yy = (y * y).sum(-1, keepdim=True)
    coef = (x * y).sum(-1, keepdim=True) / torch.where(yy > 0, yy, torch.ones_like(yy))
    return x - coef * y


def abs_cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``|cos(x, y)|`` over the last dim (broadcasting), as ``torch.nn.functional.cosine_similarity``."""
    return F.cosine_similarity(x, y, dim=-1).abs()


def row_quantile(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Linear-interpolation quantile of every row of ``x`` (B, ..., N) with one ``q`` per leading index (B,).

    Equals ``torch.quantile(x[b], q[b], dim=-1)`` for each b, without a Python loop over the batch.
    """
    n = x.shape[-1]
    s = x.sort(dim=-1).values
    pos = (q.double() * (n - 1)).reshape(-1, *([1] * (x.ndim - 1)))
    lo = pos.floor().long().clamp(0, n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    frac = (pos - lo).to(x.dtype)
    v_lo = s.gather(-1, lo.expand(*x.shape[:-1], 1))
    v_hi = s.gather(-1, hi.expand(*x.shape[:-1], 1))
    return (v_lo + frac * (v_hi - v_lo)).squeeze(-1)


def top_quantile_mask(x: torch.Tensor, q: torch.Tensor | float) -> torch.Tensor:
    """Keep entries of ``x`` (B, C, N) whose magnitude reaches the per-(sample, channel) ``q``-quantile."""
    q = torch.as_tensor(q, dtype=torch.float64).expand(x.shape[0])
    mag = x.abs()
    return torch.where(mag >= row_quantile(mag, q)[..., None], x, torch.zeros_like(x))


class ConceptGuidance(Guider):
    """``ConceptGuidance(scale=7.5, concepts="a red book; a gold clock")`` or with concepts from spaCy."""

    name = "concept"

    def __init__(
        self,
        scale: float = 7.5,
        concept_scale: float | None = None,
        concepts: str | Sequence[str] | None = None,
        extractor: str | Extractor = "spacy",
        mode: str = "v0",
        subject_threshold: float | str | None = None,
        abstract_threshold: float | str | None = None,
        upper_bound: float = 0.8,
        warm_up: int | None = None,
        cool_down: int | None = None,
        percentile: float = 0.9,
        momentum: float = 0.5,
        momentum_beta: float = 0.5,
        window: int = 5,
        rescale: float = 0.0,
    ):
        if mode not in _MODE_DEFAULTS:
            raise InputError(f"concept guidance mode {mode!r} is not one of: {', '.join(_MODE_DEFAULTS)}")
        d = _MODE_DEFAULTS[mode]
        self.mode = mode
        self.scale = float(scale)
        self.concept_scale = float(d["concept_scale"] if concept_scale is None else concept_scale)
        self.subject_threshold = _threshold(d["subject_threshold"] if subject_threshold is None else subject_threshold)
        self.abstract_threshold = _threshold(
            d["abstract_threshold"] if abstract_threshold is None else abstract_threshold
        )
        self.upper_bound = float(upper_bound)
        self.warm_up = int(d["warm_up"] if warm_up is None else warm_up)
        self.cool_down = None if cool_down is None else int(cool_down)  # None: through the last step
        self.percentile = float(percentile)
        self.momentum, self.momentum_beta, self.window = float(momentum), float(momentum_beta), int(window)
        self.rescale = float(rescale)
        if not 0.0 <= self.percentile <= 1.0:
            raise InputError(f"concept guidance percentile must lie in [0, 1], got {self.percentile}")
        if self.window < 1:
            raise InputError("concept guidance window must be >= 1")
        self.user_concepts = None if concepts is None else parse_concepts(concepts)
        self._extractor_name = extractor if isinstance(extractor, str) else getattr(extractor, "name", "custom")
        self._extractor_arg = extractor
        self._extractor: Extractor | None = None
        self._cache: dict[str, list[str]] = {}
        self._warned = False
        self._concepts: list[list[str]] = []
        self._steps: list[tuple[torch.Tensor, torch.Tensor]] = []  # per step: (B, n+1) similarities, decisions
        self._momentum: torch.Tensor | None = None
        self._history: list[torch.Tensor] = []

    # -- concepts ---------------------------------------------------------------------------------
    def concepts_for(self, prompt: str) -> list[str]:
        """The subject concepts of ``prompt``: the user's list, else the extractor's noun phrases."""
        if self.user_concepts is not None:
            return list(self.user_concepts)
        if prompt not in self._cache:
            if self._extractor is None:
                self._extractor = get_extractor(self._extractor_arg)
            self._cache[prompt] = [c for c in self._extractor(prompt) if c.strip()]
        return list(self._cache[prompt])

    def branches(self, prompt: str) -> list[str]:
        return ["", prompt, *self.concepts_for(prompt)]

    def start(self, context: BatchContext) -> None:
        super().start(context)
        self._concepts = [self.concepts_for(p) for p in context.prompts]
        counts = {len(c) for c in self._concepts}
        if len(counts) > 1:
            raise InputError(
                "concept guidance batches prompts with the same number of concepts; got "
                f"{sorted(counts)} in one batch (batch prompts by concept count, or give --concepts)"
            )
        if counts == {0} and not self._warned:
            warnings.warn("concept guidance: no concepts found in the prompt; falling back to plain CFG", stacklevel=2)
            self._warned = True
        self._steps = []
        self._momentum = None
        self._history = []

    # -- guidance ---------------------------------------------------------------------------------
    def combine(self, preds: torch.Tensor, attention: dict[str, torch.Tensor], step: StepInfo) -> torch.Tensor:
        uncond, cond = preds[0], preds[1]
        guided = uncond + self.scale * (cond - uncond)
        n = preds.shape[0] - 2
        if self._concepts and n != len(self._concepts[0]):
            raise InputError(f"concept guidance expected {len(self._concepts[0]) + 2} branches, got {n + 2}")
        if n > 0:
            b, shape = preds.shape[1], preds.shape[2:]
            x = preds.float().reshape(n + 2, b, shape[0], -1)  # (K, B, C, HW)
            s_p = x[1] - x[0]
            s_k = x[2:] - x[0]
            g, sims, applied = (self._v0 if self.mode == "v0" else self._head)(s_p, s_k, step)
            guided = guided + g.reshape(b, *shape).to(preds.dtype)
            self._steps.append((sims.T, applied.T))  # kept on the device until records()
        if self.rescale > 0:
            guided = rescale_guidance(guided, cond, self.rescale)
        return guided

    def _in_window(self, index: int) -> bool:
        if self.mode == "v0":
            return index >= self.warm_up and (self.cool_down is None or index <= self.cool_down)
        return index > self.warm_up and (self.cool_down is None or index < self.cool_down)

    def _v0(self, s_p: torch.Tensor, s_k: torch.Tensor, step: StepInfo) -> tuple[torch.Tensor, ...]:
        """Returns g (B, C, HW), similarities (n+1, B) [subjects, abstract], applied signs (n+1, B)."""
        n, b = s_k.shape[:2]
        flat_p, flat_k = s_p.flatten(1), s_k.flatten(2)  # (B, D), (n, B, D)
        s_a = reject(flat_p, flat_k.sum(0))
        c_k, c_a = self.concept_scale * flat_k, self.concept_scale * s_a
        rho_k, rho_a = abs_cosine(flat_p, c_k), abs_cosine(flat_p, c_a)  # (n, B), (B,)
        eta_s = 1.0 / (n + 1) if self.subject_threshold == "auto" else self.subject_threshold
        eta_a = 1.0 / (n + 1) if self.abstract_threshold == "auto" else self.abstract_threshold
        use_a = rho_a < eta_a
        masked_a = top_quantile_mask(c_a.reshape(s_p.shape), rho_a).flatten(1)
        g = torch.where(use_a[:, None], masked_a, torch.zeros_like(masked_a))
        sign = (rho_k < eta_s).float() - (rho_k > self.upper_bound).float()  # (n, B)
        g = g + (sign[..., None] * reject(c_k, flat_p)).sum(0)
        applied = torch.cat([sign, use_a.float()[None]])
        if not self._in_window(step.index):
            g, applied = torch.zeros_like(g), torch.zeros_like(applied)
        return g.reshape(s_p.shape), torch.cat([rho_k, rho_a[None]]), applied

    def _head(self, s_p: torch.Tensor, s_k: torch.Tensor, step: StepInfo) -> tuple[torch.Tensor, ...]:
        n, b = s_k.shape[:2]
        s_k = top_quantile_mask(s_k.reshape(n * b, *s_k.shape[2:]), self.percentile).reshape(s_k.shape)
        flat_p, flat_k = s_p.flatten(1), s_k.flatten(2)
        s_a = top_quantile_mask(s_p, self.percentile).flatten(1)
        for k in range(n):  # sequential rejection, one concept after the other
            s_a = reject(s_a, flat_k[k])
        rho = torch.cat([abs_cosine(flat_p, flat_k), abs_cosine(flat_p, s_a)[None]])  # (n+1, B)
        if self._momentum is None:
            self._momentum = torch.zeros_like(flat_k)
        h_k = flat_k + self.momentum * self._momentum
        self._momentum = self.momentum_beta * self._momentum + (1 - self.momentum_beta) * h_k
        past = self._history[max(0, step.index - self.window) : step.index]
        self._history.append(rho)
        applied = torch.zeros_like(rho)
        if past and self._in_window(step.index):
            mean = torch.stack(past).mean(0)
            applied = torch.cat([mean[:n] < self.subject_threshold, mean[n:] < self.abstract_threshold]).float()
        h = torch.cat([h_k, -(flat_p - s_a)[None]])  # (n+1, B, D)
        g = self.concept_scale * (applied[..., None] * h).sum(0)
        return g.reshape(s_p.shape), rho, applied

    def records(self) -> list[dict[str, Any]]:
        out = []
        if self._steps:
            sims = torch.stack([s for s, _ in self._steps], dim=1).tolist()  # (B, steps, n+1)
            applied = torch.stack([a for _, a in self._steps], dim=1).int().tolist()
            per_sample = [
                [{"similarity": s, "applied": a} for s, a in zip(sims[b], applied[b], strict=True)]
                for b in range(len(sims))
            ]
        else:
            per_sample = [[] for _ in self._concepts]
        for concepts, steps in zip(self._concepts, per_sample, strict=True):
            n = len(concepts)
            eta = self.subject_threshold if self.subject_threshold != "auto" else 1.0 / (n + 1)
            rec: dict[str, Any] = {
                "guidance": "concept",
                "mode": self.mode,
                "concepts": concepts,
                "concept_source": "user" if self.user_concepts is not None else self._extractor_name,
                "similarity_order": [*concepts, "<abstract>"],
                "subject_threshold": eta,
                "abstract_threshold": self.abstract_threshold if self.abstract_threshold != "auto" else 1 / (n + 1),
                "steps": steps,
            }
            if n == 0:
                rec["fallback"] = "cfg: no concepts"
            out.append(rec)
        return out

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mode": self.mode,
            "scale": self.scale,
            "concept_scale": self.concept_scale,
            "concepts": self.user_concepts,
            "extractor": self._extractor_name,
            "subject_threshold": self.subject_threshold,
            "abstract_threshold": self.abstract_threshold,
            "upper_bound": self.upper_bound,
            "warm_up": self.warm_up,
            "cool_down": self.cool_down,
            "percentile": self.percentile,
            "momentum": self.momentum,
            "momentum_beta": self.momentum_beta,
            "window": self.window,
            "rescale": self.rescale,
        }


def _threshold(value: float | str) -> float | str:
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        try:
            return float(value)
        except ValueError:
            raise InputError(f"concept guidance threshold must be a number or 'auto', got {value!r}") from None
    return float(value)
