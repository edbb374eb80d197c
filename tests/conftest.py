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
