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
def tiny_reliable(tmp_path_factory):
    """A reliable seeds file mined by ``diffprobe seeds mine`` on the shapes model (2 steps), from train prompts
    of the categories of ``report_helpers.RELIABLE_EVAL`` (count 3, relation left_of): (file, eval prompts file)."""
    from report_helpers import mine_tiny

    return mine_tiny(tmp_path_factory.mktemp("reliable"))
