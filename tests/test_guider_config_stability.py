# ruff: noqa: E501 (the recorded configs are kept as one literal each, byte for byte)
"""Stored guidance configs and job keys never change: a run made by an earlier version resumes without
regenerating anything. The literals below were recorded from the guiders as they were before their parameters
became pydantic models; they must stay byte-identical."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

from diffprobe.cli import main
from diffprobe.guidance import make_guider
from diffprobe.spec import canonical_json, job_key

IDENTITY = {"family": "sd", "id": "tiny", "revision": "abc"}
SAMPLER = {"steps": 2, "scheduler": "default", "height": 64, "width": 64, "dtype": "float32", "generator_device": "cpu"}

# (guidance, parameters as make_guider receives them, canonical config JSON, job key of ("a red circle", seed 7))
GOLDEN = [
    (
        "cfg",
        {},
        '{"name":"cfg","rescale":0.0,"scale":7.5}',
        "3e247c6469bb618c963b37c701665f587248c40c28715b3d8494a1e046765fcc",
    ),
    (
        "cfg",
        {"scale": 5.0, "rescale": 0.7},
        '{"name":"cfg","rescale":0.7,"scale":5.0}',
        "5a92fb35e5c9763fe00373626dc394367f91b9e96285c1adbba0f4a874f940df",
    ),
    (
        "cfg",
        {"scale": 3},
        '{"name":"cfg","rescale":0.0,"scale":3.0}',
        "5190a4ece4a6705930bdc546795421c08499b2f1a25f4994b8eff9984df87115",
    ),
    (
        "scfg",
        {},
        '{"benchmark":"auto","foreground_source":"uncond","max_scale":15.0,"name":"scfg","propagation":"code","propagation_order":4,"rate_max":3.0,"rate_min":0.8,"rescale":0.0,"resolution_factor":4,"scale":7.5,"smoothing_sigma":0.5,"smoothing_size":3,"ties":"code","use_rate":true}',
        "14a2c3fc6964dd3791f63b01f4228a73175cb4545324fcb5be2677bb9a80c23e",
    ),
    (
        "scfg",
        {"propagation": "paper", "ties": "argmax", "benchmark": "global", "use_rate": False},
        '{"benchmark":"global","foreground_source":"uncond","max_scale":15.0,"name":"scfg","propagation":"paper","propagation_order":4,"rate_max":3.0,"rate_min":0.8,"rescale":0.0,"resolution_factor":4,"scale":7.5,"smoothing_sigma":0.5,"smoothing_size":3,"ties":"argmax","use_rate":false}',
        "e83ea3e2af6940449d2f80c461934a199181c4286a3d0bbdc769aa3953376171",
    ),
    (
        "scfg",
        {"scale": "5", "use_rate": "true", "foreground_source": "cond", "benchmark": "foreground"},
        '{"benchmark":"foreground","foreground_source":"cond","max_scale":15.0,"name":"scfg","propagation":"code","propagation_order":4,"rate_max":3.0,"rate_min":0.8,"rescale":0.0,"resolution_factor":4,"scale":5.0,"smoothing_sigma":0.5,"smoothing_size":3,"ties":"code","use_rate":true}',
        "39c84c79a1fb4ba451146a0494c2ec0e9b4501d114bac8fbe7a0cfeddbee029e",
    ),
    (
        "scfg",
        {
            "propagation_order": 2,
            "resolution_factor": 2,
            "rate_min": 0.5,
            "rate_max": 2,
            "max_scale": 10,
            "smoothing_size": 5,
            "smoothing_sigma": 1,
            "rescale": 0.5,
        },
        '{"benchmark":"auto","foreground_source":"uncond","max_scale":10.0,"name":"scfg","propagation":"code","propagation_order":2,"rate_max":2.0,"rate_min":0.5,"rescale":0.5,"resolution_factor":2,"scale":7.5,"smoothing_sigma":1.0,"smoothing_size":5,"ties":"code","use_rate":true}',
        "a627735ee0f480f965c3d7ff3e7df18ce7da514fbb46f2a3e9b00068fc5c30d2",
    ),
    (
        "concept",
        {},
        '{"abstract_threshold":0.7,"concept_scale":7.5,"concepts":null,"cool_down":null,"extractor":"spacy","mode":"v0","momentum":0.5,"momentum_beta":0.5,"name":"concept","percentile":0.9,"rescale":0.0,"scale":7.5,"subject_threshold":"auto","upper_bound":0.8,"warm_up":0,"window":5}',
        "90b6395f1d77e46357f4a65e0ee0cbbf56e1b4cdac8a2b6ccbe8a11b5ddf80eb",
    ),
    (
        "concept",
        {"mode": "head"},
        '{"abstract_threshold":0.5,"concept_scale":8.5,"concepts":null,"cool_down":null,"extractor":"spacy","mode":"head","momentum":0.5,"momentum_beta":0.5,"name":"concept","percentile":0.9,"rescale":0.0,"scale":7.5,"subject_threshold":0.5,"upper_bound":0.8,"warm_up":5,"window":5}',
        "4d4a6065a9e60f2e89a4051ad55b808114d95c8da394702c0d1effb17db2a493",
    ),
    (
        "concept",
        {"concepts": "a red circle; a blue square"},
        '{"abstract_threshold":0.7,"concept_scale":7.5,"concepts":["a red circle","a blue square"],"cool_down":null,"extractor":"spacy","mode":"v0","momentum":0.5,"momentum_beta":0.5,"name":"concept","percentile":0.9,"rescale":0.0,"scale":7.5,"subject_threshold":"auto","upper_bound":0.8,"warm_up":0,"window":5}',
        "ce5ee80aee7612f12adcf6d637dffe67459ac1a8cdc7cd1475b2088f8dea3f18",
    ),
    (
        "concept",
        {"mode": "head", "concepts": ["a red book", "a gold clock"], "subject_threshold": "auto"},
        '{"abstract_threshold":0.5,"concept_scale":8.5,"concepts":["a red book","a gold clock"],"cool_down":null,"extractor":"spacy","mode":"head","momentum":0.5,"momentum_beta":0.5,"name":"concept","percentile":0.9,"rescale":0.0,"scale":7.5,"subject_threshold":"auto","upper_bound":0.8,"warm_up":5,"window":5}',
        "686cdac9921a5c11e52d6e1c4cef06c0a5c290b95ae859017ea11a90fa0aed62",
    ),
    (
        "concept",
        {"subject_threshold": 0.3, "abstract_threshold": "auto", "upper_bound": 0.9},
        '{"abstract_threshold":"auto","concept_scale":7.5,"concepts":null,"cool_down":null,"extractor":"spacy","mode":"v0","momentum":0.5,"momentum_beta":0.5,"name":"concept","percentile":0.9,"rescale":0.0,"scale":7.5,"subject_threshold":0.3,"upper_bound":0.9,"warm_up":0,"window":5}',
        "97cab92e4a1aa847aba9dfe5343ed4facca40a6f8149b662537ff9b347c32a34",
    ),
    (
        "concept",
        {
            "mode": "head",
            "subject_threshold": "0.4",
            "warm_up": 2,
            "cool_down": 10,
            "percentile": 0.8,
            "momentum": 0.3,
            "momentum_beta": 0.6,
            "window": 3,
            "rescale": 0.7,
            "concept_scale": 6,
        },
        '{"abstract_threshold":0.5,"concept_scale":6.0,"concepts":null,"cool_down":10,"extractor":"spacy","mode":"head","momentum":0.3,"momentum_beta":0.6,"name":"concept","percentile":0.8,"rescale":0.7,"scale":7.5,"subject_threshold":0.4,"upper_bound":0.8,"warm_up":2,"window":3}',
        "d7d168d1aa4fd949e7875104bf66324b474d6ca4951682bccde797e8757aef05",
    ),
    (
        "concept",
        {"extractor": "stanza", "scale": 4},
        '{"abstract_threshold":0.7,"concept_scale":7.5,"concepts":null,"cool_down":null,"extractor":"stanza","mode":"v0","momentum":0.5,"momentum_beta":0.5,"name":"concept","percentile":0.9,"rescale":0.0,"scale":4.0,"subject_threshold":"auto","upper_bound":0.8,"warm_up":0,"window":5}',
        "75d2a560bdec168d610629320efce677dd90d8ac832d3a4daa667ec3f5d38d8b",
    ),
]


@pytest.mark.parametrize("name,params,config_json,key", GOLDEN, ids=[f"{g[0]}-{i}" for i, g in enumerate(GOLDEN)])
def test_config_and_job_key_are_unchanged(name, params, config_json, key):
    config = make_guider(name, **params).config()
    assert canonical_json(config) == config_json
    assert job_key(IDENTITY, "a red circle", 7, SAMPLER, config) == key


class _NamedExtractor:
    name = "suite"

    def __call__(self, prompt: str) -> list[str]:
        return [prompt]


@pytest.mark.parametrize("extractor,stored", [(_NamedExtractor(), "suite"), (lambda p: [p], "custom")])
def test_extractor_objects_are_stored_by_name(extractor, stored):
    config = make_guider("concept", extractor=extractor).config()
    assert canonical_json(config) == (
        '{"abstract_threshold":0.7,"concept_scale":7.5,"concepts":null,"cool_down":null,"extractor":"%s",'
        '"mode":"v0","momentum":0.5,"momentum_beta":0.5,"name":"concept","percentile":0.9,"rescale":0.0,'
        '"scale":7.5,"subject_threshold":"auto","upper_bound":0.8,"warm_up":0,"window":5}'.replace("%s", stored)
    )


LEGACY_RUNS = Path(__file__).parent / "data" / "legacy_runs"
LEGACY_PROMPTS = ["-p", "a red circle", "-p", "two blue squares"]


def _generate(args, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.setattr(sys, "argv", ["diffprobe", "generate", *args, "-q"])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    assert exc.value.code == 0, err
    return err


@pytest.mark.parametrize(
    "guidance,extra",
    [("cfg", []), ("scfg", []), ("concept", ["--concepts", "a red circle; a blue square"])],
)
def test_a_legacy_run_resumes_without_generating(guidance, extra, tmp_path, capsys, monkeypatch):
    """Runs made before the change (tests/data/legacy_runs: shapes model, 2 steps, seeds 0-1, two prompts)."""
    run = tmp_path / guidance
    shutil.copytree(LEGACY_RUNS / guidance, run)
    before = sorted(p.relative_to(run) for p in run.rglob("*.png"))
    flags = ["--model", "shapes", "--steps", "2", *LEGACY_PROMPTS, "--guidance", guidance, *extra, "--out", str(run)]
    assert "0 generated, 4 already there" in _generate([*flags, "--seeds", "0-1"], capsys, monkeypatch)
    assert sorted(p.relative_to(run) for p in run.rglob("*.png")) == before
    # A complete run is recognised from its stored config alone; extending it makes the current code resolve the
    # guider's config again, which must equal the stored one (else: a mismatch error) and give the same job keys.
    err = _generate([*flags, "--seeds", "0-2", "--extend"], capsys, monkeypatch)
    assert re.search(r"\b2 generated at [^,]*, 4 already there", err), err
    assert set(before) <= {p.relative_to(run) for p in run.rglob("*.png")}
