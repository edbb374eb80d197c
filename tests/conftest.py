"""Shared fixtures: tiny random checkpoints written once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    from diffprobe.models.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sd_v_path(tmp_path_factory):
    from diffprobe.models.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd-v", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory):
    from diffprobe.models.tiny import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_pixart_path(tmp_path_factory):
    from diffprobe.models.tiny import build_tiny_pixart

    return build_tiny_pixart(tmp_path_factory.mktemp("models") / "tiny-pixart")


@pytest.fixture(scope="session")
def tiny_sd(tiny_sd_path):
    from diffprobe.models import load_model

    return load_model(str(tiny_sd_path), device="cpu")


@pytest.fixture(scope="session")
def make_shapes_run(tmp_path_factory):
    """``make(name, prompts, seeds)``: a shapes-model run (2 steps) of jsonl prompt records, made through the CLI."""
    import json

    from typer.testing import CliRunner

    from diffprobe.cli import app

    def make(name: str, prompts: list[dict], seeds: str = "0-1"):
        folder = tmp_path_factory.mktemp(name)
        prompt_file = folder / "prompts.jsonl"
        prompt_file.write_text("".join(json.dumps(p) + "\n" for p in prompts), encoding="utf-8")
        res = CliRunner().invoke(app, ["generate", "--model", "shapes", "--prompts", str(prompt_file), "--steps", "2",
                                       "--seeds", seeds, "--out", str(folder / "run"), "-q"])
        assert res.exit_code == 0, res.output
        return folder / "run"

    return make


@pytest.fixture(scope="session")
def tiny_reliable(tmp_path_factory):
    """A reliable seeds file mined by ``diffprobe seeds mine`` on the shapes model (2 steps), from train prompts
    of the categories of ``report_helpers.RELIABLE_EVAL`` (count 3, relation left_of): (file, eval prompts file)."""
    from report_helpers import mine_tiny

    return mine_tiny(tmp_path_factory.mktemp("reliable"))
