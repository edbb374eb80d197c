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
from collections.abc import Callable
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, field_serializer, field_validator, model_validator

from ..errors import InputError
from .base import BatchContext, FiniteFloat, Guider, GuiderParams, StepInfo
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


Threshold = float | Literal["auto"]  # "auto": 1 / (n + 1) for n concepts


class ConceptParams(GuiderParams):
    """Concept guidance's parameters. ``None`` takes the mode's default (``_MODE_DEFAULTS``) when validated, so the
    validated parameters hold the values actually used (``subject_threshold``/``abstract_threshold`` may stay
    "auto" until the number of concepts is known: ``thresholds(n)``)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    # in the order of the positional parameters: ConceptGuidance(7.5) sets the scale
    scale: FiniteFloat = 7.5
    concept_scale: FiniteFloat | None = None
    concepts: list[str] | None = None  # the user's concepts for every prompt; None: the extractor's
    extractor: str | Callable[[str], list[str]] = "spacy"  # stored by name
    mode: Literal["v0", "head"] = "v0"
    subject_threshold: FiniteFloat | Literal["auto"] | None = None
    abstract_threshold: FiniteFloat | Literal["auto"] | None = None
    upper_bound: FiniteFloat = 0.8
    warm_up: int | None = None
    cool_down: int | None = None  # None: through the last step
    percentile: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.9
    momentum: FiniteFloat = 0.5
    momentum_beta: FiniteFloat = 0.5
    window: Annotated[int, Field(ge=1)] = 5
    rescale: FiniteFloat = 0.0

    @model_validator(mode="before")
    @classmethod
    def _mode_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("mode", "v0") in _MODE_DEFAULTS:
            defaults = _MODE_DEFAULTS[data.get("mode", "v0")]
            data = {**data, **{k: v for k, v in defaults.items() if data.get(k) is None}}
        return data

    @field_validator("concepts", mode="before")
    @classmethod
    def _parse_concepts(cls, value: Any) -> Any:
        strings = isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
        return parse_concepts(value) if isinstance(value, str) or strings else value

    @field_validator("subject_threshold", "abstract_threshold", mode="before")
    @classmethod
    def _auto(cls, value: Any) -> Any:
        return "auto" if isinstance(value, str) and value.strip().lower() == "auto" else value

    @field_serializer("extractor")
    def _extractor_name(self, extractor: str | Extractor) -> str:
        return extractor if isinstance(extractor, str) else getattr(extractor, "name", "custom")

    def thresholds(self, n: int) -> tuple[float, float]:
        """The (subject, abstract) thresholds for ``n`` concepts: "auto" is 1 / (n + 1)."""
        auto = 1.0 / (n + 1)
        return tuple(auto if t == "auto" else float(t) for t in (self.subject_threshold, self.abstract_threshold))


class ConceptGuidance(Guider):
    """``ConceptGuidance(scale=7.5, concepts="a red book; a gold clock")`` or with concepts from spaCy."""

    name = "concept"
    Params = ConceptParams
    params: ConceptParams

    def __init__(self, *args: Any, **params: Any):
        super().__init__(*args, **params)
        self._extractor: Extractor | None = None
        self._cache: dict[str, list[str]] = {}
        self._warned = False
        self._concepts: list[list[str]] = []
        self._thresholds: tuple[float, float] | None = None  # (subject, abstract), resolved in start()
        self._steps: list[tuple[torch.Tensor, torch.Tensor]] = []  # per step: (B, n+1) similarities, decisions
        self._momentum: torch.Tensor | None = None
        self._history: list[torch.Tensor] = []

    # -- concepts ---------------------------------------------------------------------------------
    def concepts_for(self, prompt: str) -> list[str]:
        """The subject concepts of ``prompt``: the user's list, else the extractor's noun phrases."""
        if self.params.concepts is not None:
            return list(self.params.concepts)
        if prompt not in self._cache:
            if self._extractor is None:
                self._extractor = get_extractor(self.params.extractor)
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
        self._thresholds = self.params.thresholds(len(self._concepts[0]) if self._concepts else 0)
        self._steps = []
        self._momentum = None
        self._history = []

    # -- guidance ---------------------------------------------------------------------------------
    def combine(self, preds: torch.Tensor, attention: dict[str, torch.Tensor], step: StepInfo) -> torch.Tensor:
        if self._thresholds is None:
            raise RuntimeError("concept guidance: call start(context) before combine()")
        uncond, cond = preds[0], preds[1]
        guided = uncond + self.params.scale * (cond - uncond)
        n = preds.shape[0] - 2
        if self._concepts and n != len(self._concepts[0]):
            raise InputError(f"concept guidance expected {len(self._concepts[0]) + 2} branches, got {n + 2}")
        if n > 0:
            b, shape = preds.shape[1], preds.shape[2:]
            x = preds.float().reshape(n + 2, b, shape[0], -1)  # (K, B, C, HW)
            s_p = x[1] - x[0]
            s_k = x[2:] - x[0]
            g, sims, applied = (self._v0 if self.params.mode == "v0" else self._head)(s_p, s_k, step)
            guided = guided + g.reshape(b, *shape).to(preds.dtype)
            self._steps.append((sims.T, applied.T))  # kept on the device until records()
        if self.params.rescale > 0:
            guided = rescale_guidance(guided, cond, self.params.rescale)
        return guided

    def _in_window(self, index: int) -> bool:
        warm_up, cool_down = self.params.warm_up, self.params.cool_down
        if self.params.mode == "v0":
            return index >= warm_up and (cool_down is None or index <= cool_down)
        return index > warm_up and (cool_down is None or index < cool_down)

    def _v0(self, s_p: torch.Tensor, s_k: torch.Tensor, step: StepInfo) -> tuple[torch.Tensor, ...]:
        """Returns g (B, C, HW), similarities (n+1, B) [subjects, abstract], applied signs (n+1, B)."""
        n, b = s_k.shape[:2]
        flat_p, flat_k = s_p.flatten(1), s_k.flatten(2)  # (B, D), (n, B, D)
        s_a = reject(flat_p, flat_k.sum(0))
        c_k, c_a = self.params.concept_scale * flat_k, self.params.concept_scale * s_a
        rho_k, rho_a = abs_cosine(flat_p, c_k), abs_cosine(flat_p, c_a)  # (n, B), (B,)
        eta_s, eta_a = self._thresholds
        use_a = rho_a < eta_a
        masked_a = top_quantile_mask(c_a.reshape(s_p.shape), rho_a).flatten(1)
        g = torch.where(use_a[:, None], masked_a, torch.zeros_like(masked_a))
        sign = (rho_k < eta_s).float() - (rho_k > self.params.upper_bound).float()  # (n, B)
        g = g + (sign[..., None] * reject(c_k, flat_p)).sum(0)
        applied = torch.cat([sign, use_a.float()[None]])
        if not self._in_window(step.index):
            g, applied = torch.zeros_like(g), torch.zeros_like(applied)
        return g.reshape(s_p.shape), torch.cat([rho_k, rho_a[None]]), applied

    def _head(self, s_p: torch.Tensor, s_k: torch.Tensor, step: StepInfo) -> tuple[torch.Tensor, ...]:
        p = self.params
        n, b = s_k.shape[:2]
        s_k = top_quantile_mask(s_k.reshape(n * b, *s_k.shape[2:]), p.percentile).reshape(s_k.shape)
        flat_p, flat_k = s_p.flatten(1), s_k.flatten(2)
        s_a = top_quantile_mask(s_p, p.percentile).flatten(1)
        for k in range(n):  # sequential rejection, one concept after the other
            s_a = reject(s_a, flat_k[k])
        rho = torch.cat([abs_cosine(flat_p, flat_k), abs_cosine(flat_p, s_a)[None]])  # (n+1, B)
        if self._momentum is None:
            self._momentum = torch.zeros_like(flat_k)
        h_k = flat_k + p.momentum * self._momentum
        self._momentum = p.momentum_beta * self._momentum + (1 - p.momentum_beta) * h_k
        past = self._history[max(0, step.index - p.window) : step.index]
        self._history.append(rho)
        applied = torch.zeros_like(rho)
        if past and self._in_window(step.index):
            mean = torch.stack(past).mean(0)
            eta_s, eta_a = self._thresholds
            applied = torch.cat([mean[:n] < eta_s, mean[n:] < eta_a]).float()
        h = torch.cat([h_k, -(flat_p - s_a)[None]])  # (n+1, B, D)
        g = p.concept_scale * (applied[..., None] * h).sum(0)
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
        source = "user" if self.params.concepts is not None else self.config()["extractor"]
        for concepts, steps in zip(self._concepts, per_sample, strict=True):
            eta_s, eta_a = self._thresholds or self.params.thresholds(len(concepts))
            rec: dict[str, Any] = {
                "guidance": "concept",
                "mode": self.params.mode,
                "concepts": concepts,
                "concept_source": source,
                "similarity_order": [*concepts, "<abstract>"],
                "subject_threshold": eta_s,
                "abstract_threshold": eta_a,
                "steps": steps,
            }
            if not concepts:
                rec["fallback"] = "cfg: no concepts"
            out.append(rec)
        return out
