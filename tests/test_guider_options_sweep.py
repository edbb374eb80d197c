"""Every documented option value of S-CFG and concept guidance samples end to end on the tiny SD model."""

from __future__ import annotations

import pytest
import torch

from diffprobe.guidance import make_guider
from diffprobe.sampling import sample

PROMPTS = ["a red circle and a blue square"]
CONCEPTS = "a red circle; a blue square"
STEPS = 2

SCFG_OPTIONS = [
    {},
    {"use_rate": False},
    {"use_rate": "false"},
    {"propagation": "paper"},
    {"propagation": "code", "propagation_order": 1},
    {"foreground_source": "cond"},
    {"ties": "argmax"},
    {"benchmark": "foreground"},
    {"benchmark": "global"},
    {"rescale": 0.7},
    {"rate_min": 1.0, "rate_max": 1.5, "max_scale": 8.0},
    {"smoothing_size": 5, "smoothing_sigma": 1.0},
]
CONCEPT_OPTIONS = [
    {"mode": mode, "warm_up": 0, "subject_threshold": subject, "abstract_threshold": abstract}
    for mode in ("v0", "head")
    for subject in (0.4, "auto")
    for abstract in (0.6, "auto")
] + [
    {"mode": mode, **extra}
    for mode in ("v0", "head")
    for extra in ({}, {"rescale": 0.7}, {"warm_up": 1}, {"warm_up": 0, "cool_down": 1}, {"upper_bound": 0.3})
] + [
    {"mode": "head", "warm_up": 0, "percentile": 0.5, "momentum": 0.0, "window": 1},
    {"mode": "head", "warm_up": 0, "percentile": 1.0, "momentum_beta": 0.9, "concept_scale": 3.0},
    {"mode": "v0", "subject_threshold": "auto", "abstract_threshold": "auto", "concept_scale": 3.0},
]


def _id(params: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in params.items()) or "defaults"


def run(adapter, guider):
    return sample(adapter, guider, PROMPTS, [0], steps=STEPS, decode=False)


@pytest.mark.parametrize("params", SCFG_OPTIONS, ids=_id)
def test_every_scfg_option_samples(tiny_sd, params):
    res = run(tiny_sd, make_guider("scfg", scale=5.0, **params))
    assert torch.isfinite(res.latents).all()
    if make_guider("scfg", **params).params.use_rate:
        assert [len(r["steps"]) for r in res.records] == [STEPS]
        assert all(torch.isfinite(torch.tensor(s["rate_mean"])) for r in res.records for s in r["steps"])


@pytest.mark.parametrize("params", CONCEPT_OPTIONS, ids=_id)
def test_every_concept_option_samples(tiny_sd, params):
    guider = make_guider("concept", scale=5.0, concepts=CONCEPTS, **params)
    res = run(tiny_sd, guider)
    assert torch.isfinite(res.latents).all()
    for rec in res.records:
        assert len(rec["steps"]) == STEPS
        assert all(len(s["similarity"]) == 3 for s in rec["steps"])
        for key in ("subject_threshold", "abstract_threshold"):  # "auto" is 1/(n+1) for n = 2 concepts
            given = params.get(key, guider.params.model_dump()[key])
            assert rec[key] == pytest.approx(1 / 3 if given == "auto" else given)


def test_head_mode_resolves_auto_thresholds(tiny_sd):
    """mode="head" compared its similarities with the string "auto" (TypeError); it is 1/(n+1) as in v0."""
    guider = make_guider("concept", mode="head", warm_up=0, subject_threshold="auto", abstract_threshold="auto",
                         concepts=CONCEPTS)
    res = run(tiny_sd, guider)
    assert torch.isfinite(res.latents).all()
    assert res.records[0]["subject_threshold"] == res.records[0]["abstract_threshold"] == pytest.approx(1 / 3)
    # from the second step on, the window of past similarities decides: some concept is below 1/3 or none is
    assert res.records[0]["steps"][0]["applied"] == [0, 0, 0]
    explicit = run(tiny_sd, make_guider("concept", mode="head", warm_up=0, subject_threshold=1 / 3,
                                        abstract_threshold=1 / 3, concepts=CONCEPTS))
    assert torch.equal(res.latents, explicit.latents)
