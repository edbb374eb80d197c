"""Guiders by name. ``make_guider("cfg", scale=7.5)``."""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import InputError
from .base import AttentionLayer, BatchContext, Guider, StepInfo
from .cfg import CFG

# name -> "module:Class" (imported lazily so optional dependencies load only when used)
GUIDERS: dict[str, str] = {
    "cfg": "diffprobe.guidance.cfg:CFG",
    "scfg": "diffprobe.guidance.scfg:SCFG",
    "concept": "diffprobe.guidance.concept:ConceptGuidance",
}


def make_guider(name: str, **params: Any) -> Guider:
    if name not in GUIDERS:
        raise InputError(f"unknown guidance {name!r}; choose one of: {', '.join(GUIDERS)}")
    module, cls = GUIDERS[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)(**params)
    except TypeError as err:
        raise InputError(f"bad parameters for guidance {name!r}: {err}") from None


__all__ = ["AttentionLayer", "BatchContext", "CFG", "Guider", "StepInfo", "make_guider", "GUIDERS"]
