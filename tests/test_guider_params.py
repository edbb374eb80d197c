"""Guider parameters are typed data: validated once, with errors that name the field, the value and what is allowed;
and the guider lifecycle (prepare, then start, then combine) is explicit."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from diffprobe.commands.generate import parse_params
from diffprobe.errors import InputError
from diffprobe.guidance import CFG, AttentionLayer, BatchContext, StepInfo, make_guider
from diffprobe.guidance.concept import ConceptGuidance
from diffprobe.guidance.scfg import SCFG


@pytest.mark.parametrize(
    "name,params,message",
    [
        ("scfg", {"propagation": "x"}, "bad parameter for guidance 'scfg': propagation='x' is not one of: code, paper"),
        ("scfg", {"ties": "first"}, "ties='first' is not one of: code, argmax"),
        ("scfg", {"benchmark": "none"}, "benchmark='none' is not one of: auto, foreground, global"),
        ("scfg", {"scale": math.nan}, "bad parameter for guidance 'scfg': scale must be a finite number > 0, got nan"),
        ("scfg", {"scale": 0}, "scale must be a finite number > 0, got 0"),
        ("cfg", {"scale": math.inf}, "bad parameter for guidance 'cfg': scale must be a finite number, got inf"),
        ("cfg", {"foo": 1}, "unknown parameter 'foo' for guidance 'cfg'; allowed: rescale, scale"),
        ("scfg", {"scale": "abc"}, "scale must be a finite number > 0, got 'abc'"),
        ("scfg", {"propagation_order": 0}, "propagation_order must be an integer >= 1, got 0"),
        ("scfg", {"use_rate": "maybe"}, "use_rate must be true or false, got 'maybe'"),
        ("scfg", {"rate_min": 3, "rate_max": 1}, "guidance 'scfg': rate_min 3.0 is above rate_max 1.0"),
        ("concept", {"mode": "v3"}, "bad parameter for guidance 'concept': mode='v3' is not one of: v0, head"),
        ("concept", {"percentile": 2}, "percentile must be a finite number in [0, 1], got 2"),
        ("concept", {"subject_threshold": "often"}, "subject_threshold must be a finite number or auto or null"),
        ("concept", {"abstract_threshold": math.inf}, "abstract_threshold must be a finite number or auto or null"),
        ("concept", {"window": 0}, "window must be an integer >= 1, got 0"),
        ("concept", {"concepts": [1, 2]}, "concepts must be a list or null, got [1, 2]"),
    ],
)
def test_bad_parameters_name_the_field_value_and_what_is_allowed(name, params, message):
    with pytest.raises(InputError) as err:
        make_guider(name, **params)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "items,message",
    [
        (["scale=NaN"], "scale must be a finite number, got nan"),
        (["scale=Infinity"], "scale must be a finite number, got inf"),
        (["rescale=abc"], "rescale must be a finite number, got 'abc'"),
        (["nonsense=1"], "unknown parameter 'nonsense' for guidance 'cfg'"),
    ],
)
def test_cli_values_are_validated(items, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace("[", r"\[")):
        make_guider("cfg", **parse_params(items))


def test_cli_values_are_coerced_as_before():
    g = make_guider("scfg", **parse_params(["scale=5", "use_rate=true", "propagation=paper", "propagation_order=2"]))
    p = g.params
    assert (p.scale, p.use_rate, p.propagation, p.propagation_order) == (5.0, True, "paper", 2)
    assert make_guider("scfg", use_rate="false").params.use_rate is False
    c = make_guider("concept", **parse_params(["subject_threshold=Auto", "abstract_threshold=0.4", "concepts=a; b"]))
    assert (c.params.subject_threshold, c.params.abstract_threshold, c.params.concepts) == ("auto", 0.4, ["a", "b"])


def test_parameters_are_frozen_and_config_is_the_model():
    g = make_guider("concept", mode="head", concepts=["x"])
    with pytest.raises(ValidationError):
        g.params.scale = 3.0
    assert g.config() == {"name": "concept", **g.params.model_dump()}
    assert g.params.concept_scale == 8.5 and g.params.warm_up == 5  # the mode's defaults, resolved once
    assert CFG(5).params.scale == 5.0 and CFG(5).scale == 5.0  # positional parameters and attribute reads
    assert ConceptGuidance(6).params.scale == 6.0 and SCFG(6, 0.5).params.rescale == 0.5


def test_a_custom_extractor_object_is_kept_and_stored_by_name():
    class Lookup:
        name = "suite"

        def __call__(self, prompt):
            return ["a cat", "a dog"]

    g = make_guider("concept", extractor=Lookup())
    assert g.branches("p") == ["", "p", "a cat", "a dog"]
    assert g.config()["extractor"] == "suite"


LAYERS = [
    AttentionLayer(f"b{i}.attn{k}", "self" if k == 1 else "cross", g, g) for i, g in enumerate((8, 4)) for k in (1, 2)
]


def test_scfg_combine_needs_a_prepared_plan():
    g = SCFG()
    g.start(BatchContext(prompts=["p"], latent_size=(32, 32)))
    with pytest.raises(RuntimeError, match=r"call prepare\(layers, latent_size\) before combine"):
        g.combine(torch.randn(2, 1, 4, 32, 32), {}, StepInfo(0, 1, 999.0))
    chosen = g.prepare(LAYERS, (32, 32))
    assert [layer.name for layer in chosen] == [layer.name for layer in LAYERS]
    assert g.plan is not None and g.plan.mask_grid == (8, 8)
    assert SCFG(use_rate=False).prepare(LAYERS, (32, 32)) == [] and CFG().prepare(LAYERS, (32, 32)) == []


def test_concept_combine_needs_start():
    with pytest.raises(RuntimeError, match=r"start\(context\) before combine"):
        ConceptGuidance(concepts="a").combine(torch.randn(3, 1, 4, 2, 2), {}, StepInfo(0, 1, 999.0))
